"""Devices: data-parallel training on the engines Keras has (`distribute`) and the C allocator's
settings under training (`allocator`). The backend-specific process and device code lives here.

May import: `kerasft.util`.
"""
