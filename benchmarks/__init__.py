"""The benchmarks behind ``stf bench NAME``: one module per benchmark, each with ``main(argv)``.

They live in the clone, not in the installed package, and call only public names of
``stf_pipeline``. ``stf bench`` loads this folder by its path (``stf_pipeline.cli.load_benchmark``);
``python -m benchmarks.NAME`` from the clone's root runs one directly. Their results go to
``docs/benchmarks/*.json`` (``python docs/gen_benchmarks.py add``).
"""
