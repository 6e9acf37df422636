"""MedSafetyWorld (docs/MEDSAFETYWORLD.md): its grammar, its definition (vocabulary, parser, oracle, judge), its
generator and its evaluation sets."""
