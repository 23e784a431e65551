"""Benchmarks of the render engine against diffusers and against the hardware's measured matmul ceiling.

    movielm-fast bench --model sd15-arch --sizes 256x256 --batch-sizes 1,2 --steps 4   # the CLI
    python -m movielm_fast.bench.gpu                                                   # one call on a GPU box
    python -m movielm_fast.bench.report                                                # bench/RESULTS.md from JSON

`runner` runs the protocol and writes the files, `models` builds the real SD 1.5 / SDXL architectures with random
weights, `hardware` holds timing, FLOP counting, memory and machine metadata, `report` turns result JSON files into
CSV, a plot and RESULTS.md. Every other benchmark module owns its result format and its section of RESULTS.md
(`formats`), and builds its command line with `args`. Tests run the protocol on the demo model but never assert
timings.
"""
