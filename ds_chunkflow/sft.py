"""``python -m ds_chunkflow.sft`` / ``deepspeed --module ds_chunkflow.sft``: the SFT recipe
(:mod:`ds_chunkflow.recipes.sft`; ``--help`` lists every option)."""

from ds_chunkflow.recipes.sft import main

if __name__ == "__main__":
    main()
