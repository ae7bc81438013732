"""Ways to use DeepSeek-VL2 beyond Python calls: the `deepseek-vl2` command line (cli.py) and its sub-commands."""
