"""One module per experiment, each exposing run(cfg, run_dir). Experiments compose, never re-implement."""
