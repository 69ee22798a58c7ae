"""Loading, in one place above the model: a name or folder to a local checkpoint (hub.py), its
tensors to our layout and formats (weights.py, into arena.py's huge pages), the device and dtype
rules and the model with its tokenizer (runtime.py), and GPT2.from_pretrained / save_pretrained
(pretrained.py). The model (model.py) imports none of it."""
