"""ad_copy_gen_kor stage: English ad copy to Korean, plus Korean hashtags.

The default :class:`PhrasebookTranslator` is an honest phrasebook, not a language model: it
knows a table of common ad phrases, product nouns and number templates ("up to 30% off" ->
"최대 30% 할인"), and leaves unknown words in English and lists them. For fluent copy, point
:class:`OpenAICompatibleTranslator` at a chat-completions server or
:class:`TransformersTranslator` at a local seq2seq model (e.g. an opus-mt en-ko or NLLB dir).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .backends import require

if TYPE_CHECKING:
    from .backends import FeedlyConfig

# Longest match wins; keys are lower-case English, values Korean ad style.
PHRASES: dict[str, str] = {
    "new arrival": "신상품 출시",
    "new arrivals": "신상품 출시",
    "new collection": "새 컬렉션",
    "new season": "새 시즌",
    "just launched": "새롭게 출시",
    "limited edition": "한정판",
    "limited time offer": "기간 한정 특가",
    "limited time only": "기간 한정",
    "limited stock": "한정 수량",
    "while stocks last": "재고 소진 시까지",
    "best seller": "베스트셀러",
    "bestseller": "베스트셀러",
    "best price": "최저가",
    "free shipping": "무료 배송",
    "free delivery": "무료 배송",
    "free gift": "사은품 증정",
    "shop now": "지금 쇼핑하세요",
    "buy now": "지금 구매하세요",
    "order now": "지금 주문하세요",
    "learn more": "자세히 보기",
    "discover more": "더 알아보기",
    "don't miss out": "놓치지 마세요",
    "dont miss out": "놓치지 마세요",
    "today only": "오늘 하루만",
    "only today": "오늘 하루만",
    "this week only": "이번 주 한정",
    "this weekend only": "이번 주말 한정",
    "flash sale": "반짝 세일",
    "big sale": "빅 세일",
    "summer sale": "여름 세일",
    "winter sale": "겨울 세일",
    "spring sale": "봄 세일",
    "black friday": "블랙프라이데이",
    "holiday sale": "홀리데이 세일",
    "end of season sale": "시즌오프 세일",
    "sale": "세일",
    "special offer": "특별 혜택",
    "exclusive offer": "단독 혜택",
    "members only": "회원 전용",
    "online exclusive": "온라인 단독",
    "back in stock": "재입고",
    "coming soon": "곧 출시",
    "sold out": "품절",
    "best gift": "최고의 선물",
    "perfect gift": "완벽한 선물",
    "gift idea": "선물 추천",
    "for you": "당신을 위한",
    "for her": "그녀를 위한",
    "for him": "그를 위한",
    "made in korea": "국내 제작",
    "eco friendly": "친환경",
    "eco-friendly": "친환경",
    "all day comfort": "하루 종일 편안함",
    "all-day comfort": "하루 종일 편안함",
    "everyday essential": "데일리 필수템",
    "must have": "필수템",
    "must-have": "필수템",
    "now available": "지금 만나보세요",
    "available now": "지금 만나보세요",
    "discover": "만나보세요",
    "premium": "프리미엄",
    "classic": "클래식",
    "fresh": "산뜻한",
    "light": "가벼운",
    "lightweight": "초경량",
    "waterproof": "방수",
    "wireless": "무선",
    "handmade": "수제",
    "organic": "유기농",
    "luxury": "럭셔리",
    "stylish": "스타일리시한",
    "comfortable": "편안한",
    "durable": "튼튼한",
    "elegant": "우아한",
    "timeless": "변치 않는",
    "bold": "대담한",
    "new": "새로운",
    "summer": "여름",
    "winter": "겨울",
    "spring": "봄",
    "autumn": "가을",
    "fall": "가을",
    "collection": "컬렉션",
    "style": "스타일",
    "look": "룩",
    "sound": "사운드",
    "comfort": "편안함",
    "quality": "품질",
    "gift": "선물",
    "off": "할인",
    "and": "그리고",
    "with": "함께하는",
    "your": "당신의",
    "today": "오늘",
    "now": "지금",
    # product nouns
    "water bottle": "물병",
    "bottle": "보틀",
    "sneakers": "스니커즈",
    "sneaker": "스니커즈",
    "running shoes": "러닝화",
    "shoes": "신발",
    "mug": "머그컵",
    "coffee mug": "커피 머그컵",
    "cup": "컵",
    "perfume": "향수",
    "fragrance": "향수",
    "headphones": "헤드폰",
    "earbuds": "이어폰",
    "watch": "시계",
    "smartwatch": "스마트워치",
    "lipstick": "립스틱",
    "skincare": "스킨케어",
    "bag": "가방",
    "backpack": "백팩",
    "sunglasses": "선글라스",
    "jacket": "재킷",
    "dress": "원피스",
    "t-shirt": "티셔츠",
    "coffee": "커피",
    "tea": "차",
}

# Number templates, tried before the phrase table.
TEMPLATES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bup to (\d{1,3})\s?% off\b", re.I), "최대 {0}% 할인"),
    (re.compile(r"\b(\d{1,3})\s?% off\b", re.I), "{0}% 할인"),
    (re.compile(r"\bsave (\d{1,3})\s?%", re.I), "{0}% 절약"),
    (re.compile(r"\bbuy (\d+),? get (\d+) free\b", re.I), "{0}+{1} 증정"),
    (re.compile(r"\bbuy one,? get one free\b", re.I), "1+1 증정"),
    (re.compile(r"\bfrom \$(\d+(?:\.\d\d)?)\b", re.I), "${0}부터"),
    (re.compile(r"\bonly \$(\d+(?:\.\d\d)?)\b", re.I), "단돈 ${0}"),
    (re.compile(r"\$(\d+(?:\.\d\d)?)"), "${0}"),
)

# Korean hashtags for matched phrases (without '#').
HASHTAGS: dict[str, str] = {
    "신상품 출시": "신상",
    "한정판": "한정판",
    "기간 한정 특가": "특가",
    "무료 배송": "무료배송",
    "베스트셀러": "베스트셀러",
    "여름 세일": "여름세일",
    "겨울 세일": "겨울세일",
    "반짝 세일": "반짝세일",
    "세일": "세일",
    "블랙프라이데이": "블랙프라이데이",
    "선물": "선물추천",
    "최고의 선물": "선물추천",
    "완벽한 선물": "선물추천",
    "친환경": "친환경",
    "재입고": "재입고",
    "필수템": "필수템",
    "데일리 필수템": "데일리템",
}
PRODUCT_TAGS = {
    "보틀",
    "물병",
    "스니커즈",
    "러닝화",
    "신발",
    "머그컵",
    "커피 머그컵",
    "향수",
    "헤드폰",
    "이어폰",
    "시계",
    "스마트워치",
    "립스틱",
    "스킨케어",
    "가방",
    "백팩",
    "선글라스",
    "재킷",
}
GENERIC_TAGS = ("쇼핑", "오늘의추천", "데일리")

# Function words that Korean ad copy simply omits ("Free shipping on X" -> "X 무료 배송" reads
# fine as "무료 배송 X" too); counted as translated.
DROPPED = {"on", "the", "a", "an", "our", "of", "in", "at", "is", "are", "its", "it's", "&"}

_TOKEN_RE = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)?%?|\S")
_MAX_PHRASE_WORDS = max(len(k.split()) for k in PHRASES)


@runtime_checkable
class Translator(Protocol):
    """English ad copy in, Korean ad copy out."""

    name: str

    def translate(self, text: str) -> dict[str, Any]:
        """Return at least ``{"korean": str, "backend": str}``."""
        ...


def _translate_segment(seg: str, untranslated: list[str]) -> tuple[str, int, int]:
    """Translate one clause; returns (korean, known_words, total_words)."""
    pieces: list[tuple[int, str]] = []  # (start offset, korean) from templates
    masked = seg
    for pattern, fmt in TEMPLATES:
        for m in pattern.finditer(masked):
            pieces.append((m.start(), fmt.format(*m.groups())))
            masked = masked[: m.start()] + " " * (m.end() - m.start()) + masked[m.end() :]
    known = sum(len(p[1].split()) for p in pieces)
    total = known
    tokens = [(m.start(), m.group(0)) for m in _TOKEN_RE.finditer(masked)]
    i = 0
    while i < len(tokens):
        start, tok = tokens[i]
        if not re.match(r"[A-Za-z0-9]", tok):
            i += 1
            continue
        for n in range(min(_MAX_PHRASE_WORDS, len(tokens) - i), 0, -1):
            key = " ".join(t for _, t in tokens[i : i + n]).lower()
            if key in PHRASES:
                pieces.append((start, PHRASES[key]))
                known += n
                total += n
                i += n
                break
        else:
            if tok.lower() in DROPPED:
                known += 1
            else:
                pieces.append((start, tok))
                untranslated.append(tok)
            total += 1
            i += 1
    pieces.sort()
    # Korean puts "for X" before what it modifies: "watch for him" -> "그를 위한 시계".
    front = [p for _, p in pieces if p.endswith("위한")]
    rest = [p for _, p in pieces if not p.endswith("위한")]
    return " ".join(front + rest), known, total


class PhrasebookTranslator:
    """Template + phrase-table translation for short ad copy. NOT an LLM or MT model.

    Clauses (split on punctuation) are translated piecewise in English order; this reads
    naturally for noun-phrase copy ("Summer Sale", "New arrival", "Up to 30% off") and
    degrades visibly (English words left in place, listed in ``untranslated``) otherwise.
    """

    name = "phrasebook (not an LLM)"

    def translate(self, text: str) -> dict[str, Any]:
        """Translate ``text``; reports coverage and the words it could not translate."""
        untranslated: list[str] = []
        out_parts: list[str] = []
        known = total = 0
        for seg, punct in re.findall(r"([^.!?:,;\n]+)([.!?:,;\n]*)", text):
            if not seg.strip():
                continue
            ko, k, t = _translate_segment(seg.strip(), untranslated)
            known, total = known + k, total + t
            p = punct.strip()[:1]
            out_parts.append(ko + ("!" if p == "!" else "" if p in ("", ".", ":", ",", ";") else p))
        korean = " · ".join(x for x in out_parts if x)
        return {
            "korean": korean,
            "backend": self.name,
            "coverage": round(known / total, 4) if total else 1.0,
            "untranslated": untranslated,
        }


def korean_hashtags(korean: str, *, extra: Iterable[str] = (), limit: int = 8) -> list[str]:
    """Hashtags from the Korean copy's known phrases and product nouns, then generic ones."""
    tags: list[str] = []
    for phrase, tag in sorted(HASHTAGS.items(), key=lambda kv: -len(kv[0])):
        if phrase in korean:
            tags.append(tag)
    for noun in sorted(PRODUCT_TAGS, key=len, reverse=True):
        if noun in korean:
            tags.append(noun.replace(" ", ""))
    tags.extend(t.replace(" ", "") for t in extra)
    tags.extend(GENERIC_TAGS)
    seen: list[str] = []
    for t in tags:
        if t and t not in seen:
            seen.append(t)
    return ["#" + t for t in seen[:limit]]


TRANSLATE_SYSTEM_PROMPT = (
    "You are a Korean advertising copywriter. Translate the user's English ad copy into natural, "
    "concise Korean ad copy for an Instagram post. Keep numbers, prices and brand names. "
    "Reply with the Korean copy only, no quotes, no explanations."
)


class OpenAICompatibleTranslator:
    """Translation through an OpenAI-compatible chat-completions server."""

    def __init__(
        self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 60.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.name = f"openai-compatible:{model}"

    def translate(self, text: str) -> dict[str, Any]:
        """One chat completion at temperature 0."""
        httpx = require("httpx", purpose="the OpenAI-compatible translator")
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": TRANSLATE_SYSTEM_PROMPT},
                {"role": "user", "content": text},
            ],
        }
        resp = httpx.post(
            f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout
        )
        resp.raise_for_status()
        korean = str(resp.json()["choices"][0]["message"]["content"] or "").strip().strip('"')
        return {"korean": korean, "backend": self.name}


class TransformersTranslator:
    """A LOCAL seq2seq translation model directory (opus-mt en-ko, NLLB, M2M100, ...).

    ``source_prefix`` is prepended to the input (e.g. ``">>kor<< "`` for multi-target
    opus-mt); ``target_lang_token`` forces the first generated token (e.g. ``"kor_Hang"``
    for NLLB).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        source_prefix: str = "",
        target_lang_token: str | None = None,
        max_new_tokens: int = 128,
    ) -> None:
        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"translation model directory not found: {path}")
        self.torch: Any = require(
            "torch", extra="feedly-llava", purpose="the transformers translator"
        )
        transformers: Any = require(
            "transformers", extra="feedly-llava", purpose="the transformers translator"
        )
        self.tokenizer: Any = transformers.AutoTokenizer.from_pretrained(
            str(path), local_files_only=True
        )
        self.model: Any = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            str(path), local_files_only=True
        )
        self.model.eval()
        self.source_prefix = source_prefix
        self.target_lang_token = target_lang_token
        self.max_new_tokens = max_new_tokens
        self.name = f"transformers:{path.name}"

    def translate(self, text: str) -> dict[str, Any]:
        """Beam-free greedy translation of ``text``."""
        enc = self.tokenizer(self.source_prefix + text, return_tensors="pt")
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        if self.target_lang_token:
            kwargs["forced_bos_token_id"] = self.tokenizer.convert_tokens_to_ids(
                self.target_lang_token
            )
        with self.torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        korean = str(self.tokenizer.decode(out[0], skip_special_tokens=True)).strip()
        return {"korean": korean, "backend": self.name}


def make_translator(config: FeedlyConfig | None = None) -> Translator:
    """Build the configured translator (default: the phrasebook)."""
    if config is None or config.translator == "phrasebook":
        return PhrasebookTranslator()
    if config.translator == "openai":
        assert config.openai_base_url and config.openai_model
        return OpenAICompatibleTranslator(
            config.openai_base_url,
            config.translator_model or config.openai_model,
            config.openai_api_key,
        )
    if config.translator == "transformers":
        assert config.translator_model_path is not None
        return TransformersTranslator(config.translator_model_path)
    raise ValueError(f"unknown translator {config.translator!r}")


def ad_copy_gen_kor(
    copies: Sequence[str], translator: Translator | None = None, *, product: str | None = None
) -> dict[str, Any]:
    """ad_copy_gen_kor stage body (job level): translate each distinct copy, add hashtags."""
    tr = translator or PhrasebookTranslator()
    results: dict[str, dict[str, Any]] = {}
    for c in dict.fromkeys(copies):
        results[c] = tr.translate(c)
    first = next(iter(results.values()), {"korean": "", "backend": tr.name})
    extra = [PHRASES[product.lower()]] if product and product.lower() in PHRASES else []
    return {
        "backend": tr.name,
        "translations": results,
        "korean": first["korean"],
        "hashtags": korean_hashtags(" ".join(r["korean"] for r in results.values()), extra=extra),
    }
