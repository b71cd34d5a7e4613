"""Whole federations on this machine: what make demo, baseline, compare, bench and stems run (python -m localfed).

- federation: LocalFederation, a director and N envoys as real processes through the start scripts, and the
  process handling around them (Placement, free_port, kill_tree, deferred signals).
- settings: every setting's name and default; run: what the commands share (checks, shards, the federation, the
  notebook run); data: where a command's data comes from.
- demo, baseline, compare, bench, stems: one command each; notebook: the notebook's own definitions for them.
- netns: separate hosts on this machine (network namespaces); hosts: a LocalFederation placed on them; wan: a
  wide-area link in user space for kernels without tc's netem.

Importing the package does nothing; the launcher's import roots are joined by its entry points (roots.py).
"""
