"""The shipped configs (``blinkflow.configs``): YAML files, the demo's media, the training configs.

A package only so that an installed Blinkflow finds them with importlib.resources.
"""
