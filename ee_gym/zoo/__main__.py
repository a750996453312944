"""``python -m ee_gym.zoo ppo`` prints the path of the shipped rl-zoo3 file (for --conf-file)."""

import sys

from ee_gym.zoo import ZOO_ALGOS, conf_file

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m ee_gym.zoo {{{','.join(ZOO_ALGOS)}}}")
    print(conf_file(sys.argv[1]))
