"""`movielm-fast serve`: a resident renderer. The model loads once and stays warm; plans arrive over HTTP, wait in a
queue that survives a killed server, and render through the one driver (run.driver) with the same outputs,
manifests and resume rules as `render`. A front end, like cli: it imports engine, never the other way round.

    queue.py   the persistent queue: each accepted plan and its state as files under OUT/.movielm-serve/
    app.py     the HTTP app (starlette, the optional extra [serve]) and the render thread
    client.py  `movielm-fast render plan.json --server URL`: submit, then follow
"""
