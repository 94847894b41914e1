"""Moved: the SFT recipe is installed with the package as ``ds_chunkflow.sft``
(code in ``ds_chunkflow/recipes/sft.py``); run it as

    deepspeed --num_gpus 2 --module ds_chunkflow.sft --deepspeed_config ds_configs/sft_zero3.yaml
    python -m ds_chunkflow.sft --help

This file only forwards to it, so older command lines keep working.
"""

from ds_chunkflow.recipes.sft import main

if __name__ == "__main__":
    main()
