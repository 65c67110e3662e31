"""Model families. Each registers itself so that configs can name it by ``class_path``."""
