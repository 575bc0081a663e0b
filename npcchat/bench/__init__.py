"""``npcchat bench``: what a turn costs, as ratios against plain llama.cpp measured in the
same run (``measure``), the plain llama.cpp yardstick (``baseline``), and the child process
that measures peak memory of one mode (``child``).
"""
