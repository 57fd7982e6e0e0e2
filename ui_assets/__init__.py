"""The web UI's files, served at /ui/. A package only so that importlib.resources finds them
wherever llama-swap-py runs from: a checkout, a wheel, or a single-file zipapp."""
