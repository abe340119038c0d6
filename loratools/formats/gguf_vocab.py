"""Tokenizer metadata for GGUF files, without transformers.

``add_tokenizer`` reads a Hugging Face ``tokenizer.json`` (+ ``tokenizer_config.json``,
``config.json``, ``generation_config.json``, ``chat_template.jinja``) and writes the
``tokenizer.*`` key/values that llama.cpp reads:

* byte-level BPE vocabularies as ``tokenizer.ggml.model = "gpt2"`` with token list, token types,
  merges and the pre-tokenizer name ``tokenizer.ggml.pre`` llama.cpp dispatches its regexes on;
* sentencepiece-style BPE vocabularies (a BPE model with ``byte_fallback`` and ``▁`` for spaces,
  as Llama-2 and Mistral ship them) as ``tokenizer.ggml.model = "llama"`` with scores and token
  types (including BYTE for ``<0xXX>``);
* special token ids, ``add_bos_token`` / ``add_eos_token`` and the chat template.

The pre-tokenizer name is determined from the tokenizer itself: first the hash llama.cpp's
converter uses (the ids of a fixed check text, sha256 of ``str(ids)``) is looked up in a table of
known models, then the ``pre_tokenizer`` structure in tokenizer.json is recognized. When neither
works the caller must name it (``--pre``).

``tokenizer_files_from_gguf`` is the inverse: it rebuilds ``tokenizer.json`` and
``tokenizer_config.json`` from a GGUF's tokenizer fields, with the pre-tokenizer, decoder and
post-processor that reproduce llama.cpp's tokenization for the supported pre names.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import gguf

from .. import readpolicy
from ..errors import InputError, UnsupportedError

# ---------------------------------------------------------------------------------------------
# facts from llama.cpp (convert_hf_to_gguf.py / src/llama-vocab.cpp)
# ---------------------------------------------------------------------------------------------

# The text llama.cpp's converter encodes to fingerprint a BPE pre-tokenizer.
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHKTXT)) -> tokenizer.ggml.pre, for decoder LMs with byte-level BPE
# vocabularies (values as llama.cpp's converter has them; the comment names the reference model).
KNOWN_PRE_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # abacusai/Smaug-Llama-3-70B-Instruct
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",  # meta-llama/Llama-4-Scout-17B-16E-Instruct
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen/Qwen3.5-9B-Instruct
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-ai/deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-ai/deepseek-coder-6.7b-base
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",  # deepseek-ai/DeepSeek-V3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",  # mistral-community/pixtral-12b
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # allenai/OLMo-1.7-7B-hf (= mpt-7b)
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",  # UW/OLMo2-8B-SuperBPE-t180k
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # tiiuae/falcon-7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # tiiuae/Falcon3-7B-Base
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",  # tiiuae/Falcon-H1-0.5B-Base
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",  # tiiuae/Falcon-H1-1B-Base
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",  # tiiuae/Falcon-H1-7B-Base
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",  # tiiuae/Falcon-H1-34B-Base
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",  # smallcloudai/Refact-1_6-base
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",  # WisdomShell/CodeShell-7B
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # ByteDance-Seed/Seed-Coder-8B-Base
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",  # JetBrains/Mellum-4b-base
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",  # stabilityai/stablelm-2-zephyr-1_6b
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",  # CohereForAI/c4ai-command-r-v01
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",  # databricks/dbrx-base
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",  # LumiOpen/Poro-34B-chat
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",  # LumiOpen/Viking-7B
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",  # bigscience/bloom
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",  # TurkuNLP/gpt3-finnish-small
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",  # core42/jais-13b
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",  # LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",  # LGAI-EXAONE/EXAONE-4.0-32B
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",  # facebook/chameleon-7b
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",  # THUDM/glm-4-9b-chat
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",  # THUDM/glm-4-9b-chat
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",  # THUDM/glm-4-9b-hf
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",  # zai-org/GLM-4.5-Air
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",  # ai-sage/GigaChat-20B-A3B-instruct
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",  # Infinigence/Megrez-3B-Instruct
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",  # sapienzanlp/Minerva-7B-base-v1.0
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",  # trillionlabs/Trillion-7B-preview
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",  # inclusionAI/Ling-lite
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",  # inclusionAI/Ling-mini-base-2.0
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",  # tencent/Hunyuan-A13B-Instruct
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",  # tencent/Hunyuan-4B-Instruct
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",  # moonshotai/Kimi-K2-Base
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",  # skt/A.X-4.0
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",  # K-intelligence/Midm-2.0-Base-Instruct
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",  # LiquidAI/LFM2.5-350M
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",  # MiniMaxAI/MiniMax-M2
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",  # alvarobartt/grok-2-tokenizer
}

# Every tokenizer.ggml.pre value llama.cpp (as vendored by llama-cpp-python 0.3.36) accepts for
# a BPE vocabulary; an explicit --pre outside this set is refused rather than written.
KNOWN_PRE_NAMES = frozenset("""
default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano
deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder gpt-2 phi-2 jina-es
jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2 gemma4
granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace refact
command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe poro-chat
chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4
exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie granite-embed-multi-97m
tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe bailingmoe2 llada-moe seed-coder
hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka grok-2 afmoe laguna minimax-m2 solar-open
mellum2
""".split())

COMMON_PRE_NAMES = ("gpt-2", "llama-bpe", "qwen2", "smollm", "tekken", "deepseek-llm", "olmo")

# Pre-tokenizer regexes as Hugging Face tokenizer.json files spell them.
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
             r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O_RE = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
            r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Pre-tokenizer families: which HF pre-tokenizer reproduces llama.cpp's splitting for a pre name.
_FAMILY_OF_PRE = {
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b"), "digits+gpt2"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "dbrx", "smaug-bpe"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "solar-open", "kormo", "f2llmv2"), "qwen2"),
    "tekken": "tekken",
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), "gpt4o"),
}
_SPLIT_RE_OF_FAMILY = {"llama3": LLAMA3_RE, "qwen2": QWEN2_RE, "tekken": TEKKEN_RE, "gpt4o": GPT4O_RE,
                       "gpt2": GPT2_RE}
# llama.cpp's per-pre defaults (used when a GGUF lacks the key)
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                      "jina-v5-nano", "tekken", "minicpm5", "youtu", "glm4", "glm5", "granite-embed-multi-97m"}
_ADD_BOS_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                "jina-v5-nano", "tekken", "chameleon"}

SPIECE_UNDERLINE = "\u2581"
_BYTE_TOKEN_RE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# GGUFWriter method per special token type (cls has no writer method in gguf-py)
_ID_WRITERS = {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
               "sep": "add_sep_token_id", "pad": "add_pad_token_id", "mask": "add_mask_token_id"}
_ID_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
            "pad": "tokenizer.ggml.padding_token_id", "mask": "tokenizer.ggml.mask_token_id",
            "cls": "tokenizer.ggml.cls_token_id"}

T = gguf.TokenType


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _read_json(path: Path, required: bool = False) -> Any:
    if not path.exists() and not path.is_symlink():
        if required:
            raise InputError("file not found", path)
        return None
    text = readpolicy.read_text(path, cap=readpolicy.TOKENIZER_CAP)
    try:
        return readpolicy.loads_json(text, path)
    except InputError as e:
        raise InputError(f"cannot read JSON: {e.message}", path) from None


def _token_content(entry: Any) -> str | None:
    """A tokenizer_config ``*_token`` entry: a string or an AddedToken dict."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def does_token_look_special(token: str) -> bool:
    """llama.cpp's heuristic for added tokens that should be CONTROL although not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _merge_pairs(raw: Any, path: Path) -> list[tuple[str, str]]:
    """tokenizer.json merges in either form ("a b" strings or [a, b] lists) as pairs."""
    if not raw:
        return []
    out = []
    for m in raw:
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise InputError(f"malformed merge {m!r}", path)
            out.append((parts[0], parts[1]))
        elif isinstance(m, (list, tuple)) and len(m) == 2 and all(isinstance(p, str) for p in m):
            out.append((m[0], m[1]))
        else:
            raise InputError(f"malformed merge {m!r}", path)
    return out


def _gguf_merge(pair: tuple[str, str]) -> str:
    # GGUF stores "a b"; a space inside a part is written as U+0120 like gguf-py's SpecialVocab does
    a, b = pair
    return f"{a.replace(' ', chr(0x120))} {b.replace(' ', chr(0x120))}"


def _steps(node: dict | None, key: str) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return list(node.get(key) or [])
    return [node]


def _norm_regex(pattern: Any) -> str | None:
    if not isinstance(pattern, dict):
        return None
    if "Regex" in pattern:
        rx = pattern["Regex"]
    elif "String" in pattern:
        rx = re.escape(pattern["String"])
    else:
        return None
    # some files carry literal CR/LF characters where others have the escapes
    return rx.replace("\r", r"\r").replace("\n", r"\n")


# ---------------------------------------------------------------------------------------------
# pre-tokenizer detection
# ---------------------------------------------------------------------------------------------

def chktxt_hash(tokenizer, add_special_tokens: bool = True) -> str:
    """llama.cpp's check hash of a ``tokenizers.Tokenizer``: sha256 of ``str(ids)`` of CHKTXT."""
    ids = tokenizer.encode(CHKTXT, add_special_tokens=add_special_tokens).ids
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def pre_from_structure(tj: dict) -> str | None:
    """Recognize the common pre_tokenizer layouts of byte-level BPE tokenizer.json files."""
    sig = []
    for st in _steps(tj.get("pre_tokenizer"), "pretokenizers"):
        typ = st.get("type")
        if typ == "ByteLevel":
            sig.append(("ByteLevel", bool(st.get("use_regex", True)), bool(st.get("add_prefix_space", False))))
        elif typ == "Digits":
            sig.append(("Digits", bool(st.get("individual_digits", False))))
        elif typ == "Split":
            sig.append(("Split", _norm_regex(st.get("pattern")), str(st.get("behavior", "")).lower(),
                        bool(st.get("invert", False))))
        else:
            sig.append((typ,))
    if sig == [("ByteLevel", True, False)]:
        return "gpt-2"
    if sig == [("Digits", True), ("ByteLevel", True, False)]:
        return "smollm"
    if len(sig) == 2 and sig[0][0] == "Split" and sig[0][2:] == ("isolated", False) \
            and sig[1] == ("ByteLevel", False, False):
        rx = sig[0][1]
        by_regex = {LLAMA3_RE: "llama-bpe", QWEN2_RE: "qwen2", TEKKEN_RE: "tekken", GPT4O_RE: "gpt-4o",
                    GPT2_RE: "gpt-2", GPT2_RE.removesuffix(r"|\s+"): "gpt-2"}
        return by_regex.get(rx)
    return None


def _describe_pre(tj: dict) -> str:
    parts = []
    for st in _steps(tj.get("pre_tokenizer"), "pretokenizers"):
        desc = st.get("type", "?")
        if desc == "Split":
            rx = _norm_regex(st.get("pattern")) or "?"
            desc += f"({rx[:40]}{'…' if len(rx) > 40 else ''})"
        elif desc == "ByteLevel":
            desc += f"(use_regex={st.get('use_regex', True)}, add_prefix_space={st.get('add_prefix_space', False)})"
        parts.append(desc)
    return " + ".join(parts) or "none"


def detect_pre(tokenizer_json: Path, tj: dict | None = None) -> tuple[str, str, str | None]:
    """(pre name, how it was found: "hash" | "structure", check hash) for a byte-level BPE
    tokenizer.json; UnsupportedError when neither the hash nor the structure is known."""

    tokenizer_json = Path(tokenizer_json)
    if tj is None:
        tj = _read_json(tokenizer_json, required=True)
    chk = None
    tok = readpolicy.load_tokenizer(tokenizer_json)
    # llama.cpp's converter encodes with the post-processor on (AutoTokenizer's default); also
    # try without, for tokenizers whose BOS transformers adds differently than tokenizer.json
    for add_special in (True, False):
        h = chktxt_hash(tok, add_special)
        chk = chk or h
        if h in KNOWN_PRE_HASHES:
            return KNOWN_PRE_HASHES[h], "hash", h
    name = pre_from_structure(tj)
    if name is not None:
        return name, "structure", chk
    raise UnsupportedError(
        f"cannot tell which llama.cpp pre-tokenizer this tokenizer needs (check hash {chk[:16]}… is not "
        f"a known model's, pre_tokenizer {_describe_pre(tj)} is not a known layout); pass --pre NAME, "
        f"e.g. {', '.join(COMMON_PRE_NAMES)}", tokenizer_json)


# ---------------------------------------------------------------------------------------------
# HF files -> GGUF
# ---------------------------------------------------------------------------------------------

def _vocab_kind(tj: dict, path: Path) -> str:
    model = tj.get("model") or {}
    mtype = model.get("type")
    if mtype is None and "merges" in model and "vocab" in model:
        mtype = "BPE"
    if mtype != "BPE":
        raise UnsupportedError(f"tokenizer model type {mtype!r} is not supported (byte-level BPE and "
                               f"sentencepiece-style BPE vocabularies are)", path)
    pre_types = {st.get("type") for st in _steps(tj.get("pre_tokenizer"), "pretokenizers")}
    if model.get("byte_fallback") and "ByteLevel" not in pre_types:
        return "llama"
    return "gpt2"


def _special_tokens(tj: dict, tc: dict | None, model_dir: Path, vocab_size: int,
                    token_ids: dict[str, int]) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and add_* flags with gguf-py SpecialVocab's precedence: tokenizer_config
    names (looked up among the added tokens, then the vocab), the post-processor for the add_*
    flags (it wins over tokenizer_config), then config.json ids, then generation_config.json ids."""
    tc = dict(tc or {})
    content = {typ: _token_content(tc.get(f"{typ}_token")) for typ in _SPECIAL_TYPES}
    if not content["bos"] and content["cls"]:
        content["bos"] = content["cls"]
    if not content["eos"] and content["sep"]:
        content["eos"] = content["sep"]
    add: dict[str, bool] = {}
    for proc in _steps(tj.get("post_processor"), "processors"):
        ptype = proc.get("type")
        if ptype == "ByteLevel":
            add.setdefault("bos", False)
            add.setdefault("eos", False)
        elif ptype == "RobertaProcessing":
            add.update(bos=True, eos=True, sep=True)
            content["cls"] = content["cls"] or (proc.get("cls") or [None])[0]
            content["sep"] = content["sep"] or (proc.get("sep") or [None])[0]
        elif ptype == "TemplateProcessing":
            single = proc.get("single") or []
            if len(single) > 1:
                first = (single[0].get("SpecialToken") or {}).get("id")
                last = (single[-1].get("SpecialToken") or {}).get("id")
                if first:
                    content["bos"] = content["bos"] or first
                    add["bos"] = first in (content["bos"], content["cls"])
                if last:
                    content["eos"] = content["eos"] or last
                    add["eos"] = last == content["eos"]
    for typ in _SPECIAL_TYPES:
        flag = tc.get(f"add_{typ}_token")
        if isinstance(flag, bool) and typ not in add:
            add[typ] = flag
    added = {}
    for at in tj.get("added_tokens") or []:
        added.setdefault(at.get("content"), at.get("id"))
    ids: dict[str, int] = {}
    for typ in _SPECIAL_TYPES:
        c = content[typ]
        if c is None:
            continue
        tid = added.get(c, token_ids.get(c))
        if isinstance(tid, int) and 0 <= tid < vocab_size:
            ids[typ] = tid
    for name in ("config.json", "generation_config.json"):
        cfg = _read_json(model_dir / name) or {}
        for typ in _SPECIAL_TYPES:
            tid = cfg.get(f"{typ}_token_id")
            if tid is None and isinstance(cfg.get("text_config"), dict):
                tid = cfg["text_config"].get(f"{typ}_token_id")
            if typ not in ids and isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < vocab_size:
                ids[typ] = tid
    return ids, add


def _chat_template(tc: dict | None, model_dir: Path) -> str | list | None:
    alt = None
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists() or jinja.is_symlink():
        alt = readpolicy.read_text(jinja, model_dir, readpolicy.TEMPLATE_CAP)
        extra = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alt = [{"name": "default", "template": alt}] + [
                {"name": p.stem, "template": readpolicy.read_text(p, model_dir, readpolicy.TEMPLATE_CAP)} for p in extra]
    elif (model_dir / "chat_template.json").exists():
        alt = (_read_json(model_dir / "chat_template.json") or {}).get("chat_template")
    tmpl = (tc or {}).get("chat_template", alt)
    return tmpl if isinstance(tmpl, (str, list)) else None


def _add_space_prefix(tj: dict) -> bool:
    for n in _steps(tj.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == SPIECE_UNDERLINE:
            return True
    for p in _steps(tj.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            scheme = p.get("prepend_scheme")
            if scheme is None:
                return bool(p.get("add_prefix_space", True))
            return scheme in ("always", "first")
    return False


def _merge_scores(merges: list[tuple[str, str]]) -> dict[str, float]:
    """Sentencepiece-style scores from BPE merge ranks: the token made by the earliest merge
    scores highest, so llama.cpp's score-ordered merging follows the merge order."""
    scores: dict[str, float] = {}
    for a, b in merges:
        if a + b not in scores:  # -1, -2, ... in order of first production (Llama-2's own values)
            scores[a + b] = -float(len(scores) + 1)
    return scores


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, pre: str | None = None) -> dict:
    """Write the tokenizer.* key/values for the tokenizer in ``model_dir`` to ``writer``.

    ``vocab_size`` is the model's embedding row count (the token list is padded to it with
    ``[PAD{i}]`` UNUSED entries). ``pre`` overrides the detected ``tokenizer.ggml.pre``.
    Returns what was decided: model, pre, pre_source ("explicit" | "hash" | "structure" |
    "default"), chkhsh, vocab_size, n_merges, special_ids, add_bos, add_eos, chat_template."""
    model_dir = Path(model_dir)
    tj_path = model_dir / "tokenizer.json"
    if not tj_path.is_file() and (model_dir / "tokenizer.model").is_file():
        raise UnsupportedError("no tokenizer.json, only a sentencepiece tokenizer.model; loratools reads "
                               "tokenizer.json (saving the tokenizer with a transformers fast tokenizer writes one)",
                               model_dir)
    tj = _read_json(tj_path, required=True)
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise InputError("not a tokenizers tokenizer.json (no 'model' object)", tj_path)
    tc = _read_json(model_dir / "tokenizer_config.json")
    kind = _vocab_kind(tj, tj_path)
    model = tj["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise InputError("model.vocab is not a token -> id mapping", tj_path)
    added = {}
    for at in tj.get("added_tokens") or []:
        if isinstance(at, dict) and isinstance(at.get("id"), int) and isinstance(at.get("content"), str):
            added[at["id"]] = at
    id_to_tok: dict[int, str] = {}
    for tok, tid in vocab.items():
        id_to_tok[int(tid)] = tok
    for tid, at in added.items():
        id_to_tok[tid] = at["content"]
    top = max(id_to_tok, default=-1)
    if top >= vocab_size:
        raise InputError(f"token id {top} ({id_to_tok[top]!r}) does not fit the model's vocab_size {vocab_size}",
                         tj_path)
    merges = _merge_pairs(model.get("merges"), tj_path)
    if kind == "gpt2" and not merges:
        raise InputError("a byte-level BPE tokenizer.json without merges", tj_path)

    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    if kind == "gpt2":
        for i in range(vocab_size):
            if i not in id_to_tok:
                tokens.append(f"[PAD{i}]")
                types.append(T.UNUSED)
                continue
            tok = id_to_tok[i]
            if i in added:
                if added[i].get("special") or does_token_look_special(tok):
                    types.append(T.CONTROL)
                else:
                    tok = tok.replace(SPIECE_UNDERLINE, " ")  # user-defined tokens are pre-normalized
                    types.append(T.USER_DEFINED)
            else:
                types.append(T.NORMAL)
            tokens.append(tok)
    else:
        merge_score = _merge_scores(merges)
        unk = model.get("unk_token")
        n_merges = len(merge_score) + 1
        for i in range(vocab_size):
            if i not in id_to_tok:
                tokens.append(f"[PAD{i}]")
                types.append(T.UNUSED)
                scores.append(-1000.0)
                continue
            tok = id_to_tok[i]
            score = 0.0
            if unk is not None and tok == unk:  # as sentencepiece marks it
                ttype = T.UNKNOWN
            elif i in added:
                if added[i].get("special") or does_token_look_special(tok):
                    ttype = T.CONTROL
                else:
                    tok = tok.replace(SPIECE_UNDERLINE, " ")
                    ttype = T.USER_DEFINED
                    score = -1000.0
            elif _BYTE_TOKEN_RE.fullmatch(tok):
                ttype = T.BYTE
            else:
                ttype = T.NORMAL
                # merged pieces by merge order, single characters after all of them
                score = merge_score.get(tok, -float(n_merges + i))
            tokens.append(tok)
            types.append(ttype)
            scores.append(score)
    if len(set(tokens)) != len(tokens):
        seen: set[str] = set()
        dup = next(t for t in tokens if t in seen or seen.add(t))
        raise InputError(f"token {dup!r} appears twice in the vocabulary (llama.cpp needs unique tokens)", tj_path)

    if kind == "gpt2":
        if pre is not None:
            if pre not in KNOWN_PRE_NAMES:
                import difflib
                close = difflib.get_close_matches(pre, sorted(KNOWN_PRE_NAMES), n=3)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise UnsupportedError(f"unknown --pre {pre!r}; {hint}llama.cpp's names include "
                                       f"{', '.join(COMMON_PRE_NAMES)} ({len(KNOWN_PRE_NAMES)} in all, see "
                                       f"src/llama-vocab.cpp)")
            pre_name, source, chk = pre, "explicit", None
        else:
            pre_name, source, chk = detect_pre(tj_path, tj)
    else:
        pre_name, source, chk = (pre, "explicit", None) if pre is not None else ("default", "default", None)

    token_ids = {t: i for i, t in id_to_tok.items()}
    special_ids, add_flags = _special_tokens(tj, tc, model_dir, vocab_size, token_ids)
    chat_template = _chat_template(tc, model_dir)

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types([int(t) for t in types])
    if kind == "gpt2":
        writer.add_token_merges([_gguf_merge(m) for m in merges])
    else:
        writer.add_add_space_prefix(_add_space_prefix(tj))
    for typ, tid in special_ids.items():
        if typ in _ID_WRITERS:
            getattr(writer, _ID_WRITERS[typ])(tid)
    for typ in ("bos", "eos", "sep"):
        if typ in add_flags:
            getattr(writer, f"add_add_{typ}_token")(add_flags[typ])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    return {
        "model": kind, "pre": pre_name, "pre_source": source, "chkhsh": chk, "vocab_size": vocab_size,
        "n_tokens": len(id_to_tok), "n_merges": len(merges) if kind == "gpt2" else 0,
        "special_ids": {t: i for t, i in special_ids.items() if t in _ID_WRITERS},
        "add_bos": add_flags.get("bos"), "add_eos": add_flags.get("eos"),
        "add_space_prefix": _add_space_prefix(tj) if kind == "llama" else None,
        "chat_template": chat_template is not None,
    }


# ---------------------------------------------------------------------------------------------
# GGUF -> HF files
# ---------------------------------------------------------------------------------------------

def gguf_field_value(field: Any) -> Any:
    """The Python value of a GGUFReader field (str, int, float, bool, or a list of them); values
    that are not ReaderFields are returned unchanged."""
    if not hasattr(field, "types") or not hasattr(field, "parts"):
        return field
    types = field.types
    if not types:
        return None
    vt = gguf.GGUFValueType
    if types[0] == vt.ARRAY:
        if len(types) < 2:
            return []
        if types[1] == vt.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if types[1] == vt.ARRAY:
            raise UnsupportedError("nested GGUF arrays are not supported here")
        if not len(field.data):
            return []
        import numpy as np
        arr = np.concatenate([field.parts[i] for i in field.data])
        return [bool(x) for x in arr] if types[1] == vt.BOOL else arr.tolist()
    part = field.parts[field.data[0]]
    if types[0] == vt.STRING:
        return bytes(part).decode("utf-8")
    value = part[0].item()
    return bool(value) if types[0] == vt.BOOL else value


_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_kv(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file as plain Python values, without the tensor infos.

    gguf.GGUFReader builds a numpy view per array element, which takes seconds for a 150k-token
    vocabulary; this reads the same values directly (strings, numbers, bools, lists of them)."""
    import mmap
    import struct

    import numpy as np

    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot open: {e.strerror}", path) from None
    with fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # empty file
            raise InputError("not a GGUF file (empty)", path) from None
        try:
            from .gguf_header import HEADER_BYTES, parse_header

            hdr = parse_header(buf[:HEADER_BYTES], len(buf), path)
            end, n_kv, pos, size = hdr.endian, hdr.n_kv, HEADER_BYTES, len(buf)

            def take(n: int) -> int:
                nonlocal pos
                if n < 0 or pos + n > size:
                    raise InputError("truncated GGUF metadata", path)
                start = pos
                pos += n
                return start

            def string() -> str:
                n = struct.unpack_from(end + "Q", buf, take(8))[0]
                s = take(n)
                return buf[s:s + n].decode("utf-8")

            def value(vtype: int) -> Any:
                if vtype == 8:
                    return string()
                if vtype in _SCALAR_FORMATS:
                    fmt = end + _SCALAR_FORMATS[vtype]
                    return struct.unpack_from(fmt, buf, take(struct.calcsize(fmt)))[0]
                if vtype == 9:
                    etype = struct.unpack_from(end + "I", buf, take(4))[0]
                    count = struct.unpack_from(end + "Q", buf, take(8))[0]
                    if etype in _SCALAR_FORMATS:
                        width = struct.calcsize(_SCALAR_FORMATS[etype])
                        arr = np.frombuffer(buf, dtype=np.dtype(end + _SCALAR_FORMATS[etype]), count=count,
                                            offset=take(width * count))
                        return arr.tolist()
                    return [value(etype) for _ in range(count)]
                raise InputError(f"unknown GGUF value type {vtype}", path)

            out: dict[str, Any] = {}
            for _ in range(n_kv):
                key = string()
                vtype = struct.unpack_from(end + "I", buf, take(4))[0]
                out[key] = value(vtype)
            return out
        except struct.error:
            raise InputError("truncated GGUF metadata", path) from None
        except UnicodeDecodeError:
            raise InputError("GGUF metadata string is not UTF-8", path) from None
        finally:
            buf.close()


def _field(fields: Any, key: str, default: Any = None) -> Any:
    f = fields.get(key) if hasattr(fields, "get") else None
    return default if f is None else gguf_field_value(f)


def spm_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece/llama.cpp score-ordered merging: every split of a
    mergeable piece into two vocabulary pieces, ordered by the piece's score (highest first)."""
    out = []
    for piece, score in scores.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                out.append((-score, vocab[a], vocab[b], a, b))
    out.sort()
    return [(a, b) for *_, a, b in out]


def tokenizer_files_from_gguf(fields: Any) -> dict[str, str]:
    """Rebuild ``tokenizer.json`` and ``tokenizer_config.json`` (as JSON text, by file name) from
    a GGUF's tokenizer fields (``gguf.GGUFReader(path).fields`` or a dict of plain values)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = _field(fields, "tokenizer.ggml.model")
    if kind is None:
        raise InputError("the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
    if kind not in ("gpt2", "llama"):
        raise UnsupportedError(f"GGUF tokenizer model {kind!r} cannot be rebuilt (gpt2 and llama can)")
    tokens = _field(fields, "tokenizer.ggml.tokens")
    if not tokens:
        raise InputError("the GGUF has no token list (tokenizer.ggml.tokens)")
    n = len(tokens)
    types = _field(fields, "tokenizer.ggml.token_type") or [int(T.NORMAL)] * n
    if len(types) < n:
        raise InputError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    pre = _field(fields, "tokenizer.ggml.pre")
    ids = {typ: _field(fields, key) for typ, key in _ID_KEYS.items()}
    ids = {typ: v for typ, v in ids.items() if isinstance(v, int) and 0 <= v < n}
    add_bos = _field(fields, "tokenizer.ggml.add_bos_token")
    add_eos = _field(fields, "tokenizer.ggml.add_eos_token")
    if add_bos is None:  # llama.cpp's default for this vocabulary
        add_bos = kind == "llama" or pre in _ADD_BOS_PRE
    add_eos = bool(add_eos)

    def is_pad(i: int) -> bool:  # a converter's filler for an id the tokenizer does not have
        return tokens[i] == f"[PAD{i}]" and types[i] not in (T.CONTROL, T.USER_DEFINED)

    vocab = {tok: i for i, tok in enumerate(tokens) if not is_pad(i)}
    if kind == "gpt2":
        family = _FAMILY_OF_PRE.get(pre)
        if pre is None:
            raise UnsupportedError("the GGUF's BPE tokenizer has no tokenizer.ggml.pre (a file from before llama.cpp "
                                   "recorded pre-tokenizers); its tokenizer cannot be rebuilt")
        if family is None:
            supported = sorted(_FAMILY_OF_PRE)
            raise UnsupportedError(f"rebuilding a tokenizer.json for tokenizer.ggml.pre {pre!r} is not supported "
                                   f"(supported: {', '.join(supported)}, and llama/sentencepiece vocabularies)")
        merges = []
        for m in _field(fields, "tokenizer.ggml.merges") or []:
            parts = m.split(" ")
            if len(parts) != 2:
                raise InputError(f"malformed merge {m!r} in tokenizer.ggml.merges")
            pair = []
            for p in parts:
                if p not in vocab and p.replace("\u0120", " ") in vocab:
                    p = p.replace("\u0120", " ")
                pair.append(p)
            merges.append(tuple(pair))
        if not merges:
            raise InputError("the GGUF's gpt2 tokenizer has no merges (tokenizer.ggml.merges)")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                   ignore_merges=pre in _IGNORE_MERGES_PRE))
        if family == "gpt2":
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        elif family == "digits+gpt2":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLIT_RE_OF_FAMILY[family]), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if family == "qwen2":
            tok.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json
        tok.decoder = decoders.ByteLevel()
    else:
        scores = _field(fields, "tokenizer.ggml.scores") or [0.0] * n
        add_prefix = _field(fields, "tokenizer.ggml.add_space_prefix")
        add_prefix = True if add_prefix is None else bool(add_prefix)
        mergeable = {tokens[i]: float(scores[i]) for i in range(n) if types[i] == T.NORMAL and len(tokens[i]) > 1}
        normal_vocab = {t: i for t, i in vocab.items() if types[i] == T.NORMAL}
        merges = spm_merges(normal_vocab, mergeable)
        unk_id = ids.get("unk")
        if unk_id is None:
            unk_id = next((i for i, t in enumerate(types) if t == T.UNKNOWN), None)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None if unk_id is None else tokens[unk_id],
                                   fuse_unk=True, byte_fallback=True))
        norms = [normalizers.Prepend(SPIECE_UNDERLINE)] if add_prefix else []
        tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", SPIECE_UNDERLINE)])
        decs = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            decs.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(decs)

    # control and user-defined tokens are matched before tokenization, as llama.cpp does
    specials = [AddedToken(tokens[i], special=types[i] == T.CONTROL, normalized=False)
                for i in range(n) if types[i] in (T.CONTROL, T.USER_DEFINED)]
    tok.add_tokens(specials)

    bos = tokens[ids["bos"]] if "bos" in ids else None
    eos = tokens[ids["eos"]] if "eos" in ids else None
    if (add_bos and bos) or (add_eos and eos):
        single = ([f"{bos}:0"] if add_bos and bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos and eos else [])
        pair = single + [s.replace(":0", ":1") for s in single]
        pair = [s.replace("$A:1", "$B:1") for s in pair]
        sp = {t: vocab.get(t, ids.get(k)) for k, t in (("bos", bos), ("eos", eos)) if t}
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=[(t, i) for t, i in sp.items()])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    tokenizer_json = json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"

    config: dict[str, Any] = {
        "add_bos_token": bool(add_bos), "add_eos_token": add_eos,
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": types[i] == T.CONTROL}
            for i in range(n) if types[i] in (T.CONTROL, T.USER_DEFINED)},
    }
    for typ in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        if typ in ids:
            config[f"{typ}_token"] = tokens[ids[typ]]
        elif typ in ("bos", "eos", "unk", "pad"):
            config[f"{typ}_token"] = None
    template = _field(fields, "tokenizer.chat_template")
    names = _field(fields, "tokenizer.chat_templates") or []
    if names:
        template = [{"name": "default", "template": template}] if template is not None else []
        template += [{"name": nm, "template": _field(fields, f"tokenizer.chat_template.{nm}")} for nm in names]
    if template is not None:
        config["chat_template"] = template
    config.update({"clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
                   "tokenizer_class": "PreTrainedTokenizerFast"})
    if kind == "llama":
        config["legacy"] = True
    return {"tokenizer.json": tokenizer_json,
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}
