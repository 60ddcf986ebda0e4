"""Command-line front ends of `modeling_muddpythia` that answer `--help` and reject bad arguments without
importing torch or transformers (several seconds): arguments are parsed here first, the work is imported after.

The entry points `mudd-convert` and `mudd-finetune` point here; `python -m modeling_muddpythia.convert` and
`python -m modeling_muddpythia.finetune` use the same parsers.
"""
