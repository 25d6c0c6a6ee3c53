"""`sdlora ui`: a local web app over the same stages the CLI runs (the command: `commands/ui.py`)."""
