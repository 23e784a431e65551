"""Styles: the style library and MovieLLM's style immobilization (one learned textual-inversion token per style).

Between the render core and the run: training renders scenes through whatever renderer the run hands it
(`SceneRenderer`), and the run binds the learned tokens.
"""
