"""The gate's one home: temporal-redundancy skipping (docs/skipping.md), one module per concern.

* :mod:`.signal` — the change signal: grayscale block means, blur, light fit, changed mask.
* :mod:`.tiles` — the tile grid the model stages recompute on, and patching a reference by tiles.
* :mod:`.motion` — motion fields from the decoder's motion vectors, composing, warping, shifting boxes.
* :mod:`.policy` — the per-stream decision (reuse, partial, refresh, keyframe), the adaptive
  threshold, audits and refresh bounds; the gate stage (stages/gate.py) is its thin adapter.
* :mod:`.agreement` — box F1 and mask mIoU, the measures behind the stages' ``agreement``.
* :mod:`.carry` — the driver's half: carry results over along motion, score audits, feed them back.

Below the stages and the runners: it imports only the core (frame, registry), config and numpy
(scipy and the registered stage classes where used), and no stage by name.
"""
