"""Exercise checks of the notebooks: one module per notebook; each check says what is wrong, never the answer."""
