"""Pictures for the notebooks, drawn with matplotlib from live tensors (no JavaScript, no CDN).

One module per subject; import from the module, e.g. ``from course_lib.viz.attention import
plot_heatmap``. Each figure in ``figures/`` is drawn by these functions (scripts/make_figures.py).
"""
