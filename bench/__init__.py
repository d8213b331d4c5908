"""batcher's benchmarks: each module ``bench/<name>.py`` has ``run(quick: bool) -> list[Result]``; see ``run.py``."""
