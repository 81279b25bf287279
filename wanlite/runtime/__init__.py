"""Where weights live while a call runs, and what is kept between steps: components and
their life cycle, the memory planner, offload, multi-process layouts, step caches, tiled
decode, the prompt-embedding cache and peak-memory measurement."""
