"""Write `tokenizer.model`: a SentencePiece vocabulary matching the benchmark checkpoint's word-level one.

llama.cpp's `convert_hf_to_gguf.py` needs a vocabulary it recognises, and the benchmark's random checkpoint
has a word-level `tokenizer.json` (`<pad>`, `<s>`, `</s>`, then `w3`, `w4`, ...). The same pieces as a
SentencePiece model let the converter run unmodified; the benchmark feeds token ids, so only the vocabulary's
size and its special ids (bos 1, eos 2) matter. Runs in the llama venv (it has `sentencepiece`).

    python spm_vocab.py CHECKPOINT_DIR VOCAB_SIZE
"""

import sys
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as pb


def main() -> None:
    folder, vocab = Path(sys.argv[1]), int(sys.argv[2])
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.BPE
    model.trainer_spec.vocab_size = vocab
    model.trainer_spec.unk_id, model.trainer_spec.bos_id, model.trainer_spec.eos_id = 0, 1, 2
    model.trainer_spec.pad_id = -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    piece_type = pb.ModelProto.SentencePiece
    special = {0: piece_type.UNKNOWN, 1: piece_type.CONTROL, 2: piece_type.CONTROL}
    for i, text in enumerate(["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, vocab)]):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, -float(i), special.get(i, piece_type.NORMAL)
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())


if __name__ == "__main__":
    main()
