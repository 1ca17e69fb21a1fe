"""Interactive views built with ipywidgets (no JavaScript of our own).

Each builder keeps its logic in plain functions that take the widget values and return data or a
figure, so tests call them without a browser. One module per notebook subject.
"""
