"""Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr behind one interface) and a fast CIDEr-D."""
