"""Class vocabularies of the project's synthetic scenes.

Index 0 is always background, as in torchvision's detection and segmentation
conventions. The synthetic scene generator, the training code, the shipped
weights and the stages all use these lists, so they never disagree.
"""

SYNTHETIC_CLASSES: list[str] = ["background", "disc", "square", "triangle", "ring", "cross"]

#: per-clip action labels of the synthetic scenes
SYNTHETIC_ACTIONS: list[str] = ["static", "slide-left", "slide-right", "rotate", "grow", "shrink", "bounce"]
