"""A gym package for the rl-zoo3 tests (``--gym-packages tests.zoo_package``): importing it registers
a user task over the tiny files whose folder ``EE_GYM_ZOO_DATA`` names (its env id:
``ConsistentEE-zootiny-v0``)."""

import os

from ee_gym.tasks import task_from_files

_root = os.environ["EE_GYM_ZOO_DATA"]
task_from_files("zootiny", train=f"{_root}/train.tsv", dev=f"{_root}/dev.tsv", text_columns=["sentence"],
                label_column="label")  # fmt: skip
