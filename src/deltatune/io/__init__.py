"""Reading and writing adapters: the Hugging Face PEFT format, safely."""
