"""Built-in architecture declarations, one short file each. Importing this package registers them."""
from . import gemma, llama, mistral, qwen3  # noqa: F401
