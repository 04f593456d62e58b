"""User prompts that ask the model to describe an image, several phrasings per SiLu language.

Each sample gets one phrasing, picked by :func:`choose_prompt` from a sha256
of ``convert.prompt_seed`` and the record's ``img_id``. The choice is the
same on every run and machine (Python's ``hash()`` is salted per process,
so it is not used), and varying the wording keeps the model from tying
captions to one fixed sentence.

Every prompt is in the language of the captions it precedes, so a Korean
caption is never requested in another language.

NOTE: the Serbian prompts are in Cyrillic; whether the SiLu Serbian captions
use Cyrillic or Latin script has not been checked.
"""

from __future__ import annotations

import hashlib

PROMPTS: dict[str, tuple[str, ...]] = {
    "ko": (
        "이 이미지를 설명해 주세요.",
        "이 사진에 무엇이 있는지 설명해 주세요.",
        "이 이미지의 내용을 자세히 설명해 주세요.",
        "사진 속 장면을 묘사해 주세요.",
        "이 사진에 대한 설명을 작성해 주세요.",
        "이 이미지에서 무엇을 볼 수 있나요? 설명해 주세요.",
    ),
    "ru": (
        "Опишите это изображение.",
        "Подробно опишите, что изображено на картинке.",
        "Что изображено на этой фотографии? Опишите.",
        "Составьте описание к этому изображению.",
        "Опишите содержание этого снимка.",
    ),
    "vi": (
        "Hãy mô tả hình ảnh này.",
        "Hãy mô tả chi tiết nội dung của bức ảnh.",
        "Bức ảnh này cho thấy điều gì? Hãy mô tả.",
        "Viết mô tả cho hình ảnh này.",
    ),
    "ar": (
        "صف هذه الصورة.",
        "صف بالتفصيل ما يظهر في هذه الصورة.",
        "ماذا تُظهر هذه الصورة؟ صفها.",
        "اكتب وصفًا لهذه الصورة.",
    ),
    "hu": (
        "Írd le ezt a képet.",
        "Írd le részletesen, mi látható a képen.",
        "Mit ábrázol ez a fénykép? Írd le.",
        "Készíts leírást ehhez a képhez.",
    ),
    "cs": (
        "Popiš tento obrázek.",
        "Podrobně popiš, co je na obrázku.",
        "Co zachycuje tato fotografie? Popiš ji.",
        "Napiš popis tohoto obrázku.",
    ),
    "th": (
        "โปรดอธิบายภาพนี้",
        "อธิบายรายละเอียดของสิ่งที่อยู่ในภาพนี้",
        "ภาพนี้แสดงอะไร โปรดอธิบาย",
        "เขียนคำบรรยายสำหรับภาพนี้",
    ),
    "sr": (
        "Опиши ову слику.",
        "Детаљно опиши шта се види на слици.",
        "Шта приказује ова фотографија? Опиши је.",
        "Напиши опис ове слике.",
    ),
}


def choose_prompt(lang: str, img_id: str, seed: int) -> str:
    """Return the prompt phrasing for one record; the same inputs always give the same phrasing.

    Raises KeyError naming the language when no prompts exist for ``lang``.
    """
    try:
        phrasings = PROMPTS[lang]
    except KeyError:
        raise KeyError(f"no prompts for language {lang!r}; add them to stages/prompts.py (have {sorted(PROMPTS)})") from None
    digest = hashlib.sha256(f"{seed}\0{img_id}".encode()).digest()
    return phrasings[int.from_bytes(digest[:8], "big") % len(phrasings)]
