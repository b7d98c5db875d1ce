"""``blinkflow bench``: side-by-side benchmarks, apart from the engine they measure.

``common`` holds the shared pieces (machine info, tables, the docs sections), ``cli`` the
sub-command, and each other module one benchmark. They are developer tools: they read the
repository's test media and write ``docs/``.
"""
