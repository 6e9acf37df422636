"""Real text (FineWeb-Edu and the like): the gpt2 tokenizer, span labels and the streaming workers, the built-in
classifier, guard and judge models, and the real-text attacks."""
