"""The run: plans -> files. One driver for every way of running (local, Ray, `serve`, `make`).

    driver      plans -> styles -> tasks -> batches -> writes; resume, out-of-memory policy, failure isolation
    executors   where batches run (this process; `cluster`: Ray workers), behind one small interface
    renderer    what a worker holds: the loaded model, its backend and prompt encoder, and the frames' tasks
    tasks       the run's value types: a frame's task and resume key, a batch, what comes back
    writer      the threads that encode and write frames while the next batch renders
    outputs     frame files with their metadata, manifests and journals, storyboards

It calls the render core (`engine`: one batch -> pixels) and style immobilization (`style`); the render core never
imports it.
"""
