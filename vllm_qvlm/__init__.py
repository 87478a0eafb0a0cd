"""vLLM plugin."""
def register():
    pass
