"""Styles: the style library and MovieLLM's style immobilization (one learned textual-inversion token per style).

Between the render core and the run: training renders scenes through whatever renderer the run hands it
(`SceneRenderer`), and the run binds the learned tokens.

    immobilize   immobilize_style: style -> scenes or user images -> VAE latents -> train the token -> library entry
    scenes       scenes rendered in the style by our engine; SceneRenderer, what training needs of the renderer
    images       the user's image folders: loading, fitting, caption files, captions for uncaptioned images
    training     learning the token: StyleSettings, the starting vectors and token checks, the trainer
    library      the library on disk: folder, entry names, index, file formats, StyleResult
"""
