"""Pipeline stages: one plain class per file, registered by name.

A stage never imports Ray. It implements ``setup(device)``, ``process(frames)``
and ``teardown()``; the runners (local or Ray) call them.
"""
