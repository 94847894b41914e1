"""Installed training programs: ``python -m ds_chunkflow.sft`` (:mod:`ds_chunkflow.recipes.sft`)."""
