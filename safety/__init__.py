"""
What the stage scripts at the root share, and what a first read can skip (README.md, "How the code is laid out").
The package never imports a stage script: model.py's GPT is passed in where a model is built (common.load_run).
"""
