"""The model: pretrained DistilBERT classifiers (`presets`), the encoder as training runs it
(`encoder`) and LoRA adapters (`lora`).

May import: `kerasft.devices`, `kerasft.tokens`, `kerasft.util`.
"""
