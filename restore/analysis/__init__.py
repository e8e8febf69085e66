"""Building blocks of ``python -m restore.bench`` and ``python -m restore.analyze``.

models:     the models they run (small checkpoint, a real checkpoint, a random LLaVA-1.5-7B-shaped model)
timing:     warm-up + median timers (CUDA events on a GPU) and peak-memory meters
attention:  share of attention mass that visual tokens receive, per layer (the paper's Figure 2)
token_map:  which patches each reduced token stands for, drawn over the image
"""
