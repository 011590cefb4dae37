"""Helpers every layer may use, none importing another kerasft module: atomic files (`fileio`),
the machine a figure ran on (`machine`), library versions (`versions`), one timing loop
(`timing`), how errors name options (`wording`) and classification metrics (`metrics`).

May import: nothing else of kerasft.
"""
