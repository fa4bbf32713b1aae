"""Vocabulary of the synthetic world and how to say things about it in English and Chinese.

Everything here is a constant or a pure function of its arguments; no randomness, no images.
The scenes (`synthetic_scenes.py`) and tasks (`synthetic_tasks.py`) use these names, and
`world_text()` in `synthetic.py` walks all of them so the LM and the BPE see every word.
"""
from __future__ import annotations

LANGS = ("en", "zh")

# name -> (RGB, English, Chinese). Saturated colours that stay distinct on the light backgrounds.
COLOURS: dict[str, tuple[tuple[int, int, int], str, str]] = {
    "red": ((220, 40, 40), "red", "红色"),
    "orange": ((245, 140, 20), "orange", "橙色"),
    "yellow": ((235, 200, 0), "yellow", "黄色"),
    "green": ((40, 160, 60), "green", "绿色"),
    "blue": ((40, 90, 220), "blue", "蓝色"),
    "purple": ((140, 60, 180), "purple", "紫色"),
    "pink": ((245, 120, 190), "pink", "粉色"),
    "brown": ((130, 80, 40), "brown", "棕色"),
    "black": ((30, 30, 30), "black", "黑色"),
}

# kind -> (English singular, English plural, Chinese, number of sides or None)
SHAPES: dict[str, tuple[str, str, str, int | None]] = {
    "circle": ("circle", "circles", "圆形", None),
    "square": ("square", "squares", "正方形", 4),
    "triangle": ("triangle", "triangles", "三角形", 3),
    "star": ("star", "stars", "五角星", 10),
    "diamond": ("diamond", "diamonds", "菱形", 4),
    "hexagon": ("hexagon", "hexagons", "六边形", 6),
    "cross": ("cross", "crosses", "十字", 12),
}

# size -> (side as a fraction of min(W, H): low, high). The gaps between bins keep "large" unambiguous.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.14),
    "medium": (0.18, 0.23),
    "large": (0.28, 0.34),
}

# background kind -> (English adjective, Chinese description)
BACKGROUNDS: dict[str, tuple[str, str]] = {
    "plain": ("plain", "纯色"),
    "gradient": ("gradient", "渐变"),
    "noise": ("noisy", "带噪点的"),
    "stripes": ("striped", "条纹"),
    "checker": ("checkered", "格子"),
    "clouds": ("cloudy", "云纹"),
}

# Ink colours for rendered text: dark, so they read on every background.
TEXT_COLOURS = ((20, 20, 20), (20, 40, 130), (130, 20, 20), (20, 90, 40))

EN_WORDS = (
    "apple", "banana", "cat", "dog", "sun", "moon", "tree", "book", "water", "house", "river", "cloud",
    "bird", "fish", "rain", "snow", "hill", "flower", "grass", "car", "boat", "bridge", "door", "window",
    "chair", "table", "phone", "school", "teacher", "friend", "hello", "thanks", "spring", "summer",
    "autumn", "winter", "morning", "night", "city", "world", "music", "paper", "coffee", "bread",
    "garden", "train", "light", "dream",
)
ZH_WORDS = (
    "苹果", "香蕉", "猫", "狗", "太阳", "月亮", "树", "书", "水", "房子", "河流", "云朵",
    "小鸟", "鱼", "下雨", "雪花", "山", "花", "草地", "汽车", "小船", "桥", "门", "窗户",
    "椅子", "桌子", "手机", "学校", "老师", "朋友", "你好", "谢谢", "春天", "夏天",
    "秋天", "冬天", "早上", "晚上", "城市", "世界", "音乐", "纸", "咖啡", "面包",
    "花园", "火车", "灯光", "梦想",
)
# Same index = same meaning, for translation questions.
assert len(EN_WORDS) == len(ZH_WORDS)

EN_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
              "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
              "nineteen", "twenty")
ZH_DIGITS = "零一二三四五六七八九"


def zh_number(n: int) -> str:
    """Chinese numeral for 0 <= n < 100, e.g. zh_number(12) == "十二", zh_number(20) == "二十"."""
    if not 0 <= n < 100:
        raise ValueError(f"zh_number supports 0..99, got {n=}")
    if n < 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "十" if tens == 1 else ZH_DIGITS[tens] + "十"
    return head + (ZH_DIGITS[ones] if ones else "")


def zh_count(n: int) -> str:
    """Chinese count before a measure word: 2 is 两, e.g. zh_count(2) == "两", zh_count(3) == "三"."""
    return "两" if n == 2 else zh_number(n)


def en_count(n: int) -> str:
    """English number word, e.g. en_count(3) == "three"; digits above twenty."""
    return EN_NUMBERS[n] if 0 <= n < len(EN_NUMBERS) else str(n)


def colour_name(colour: str, lang: str) -> str:
    """e.g. colour_name("red", "zh") == "红色"."""
    return COLOURS[colour][1] if lang == "en" else COLOURS[colour][2]


def shape_name(kind: str, lang: str, plural: bool = False) -> str:
    """e.g. shape_name("cross", "en", plural=True) == "crosses"; Chinese has no plural."""
    en, en_pl, zh, _ = SHAPES[kind]
    return (en_pl if plural else en) if lang == "en" else zh


def object_phrase(colour: str | None, kind: str | None, lang: str, *, size: str | None = None,
                  position: str | None = None, article: str = "the") -> str:
    """Noun phrase for one object.

    >>> object_phrase("red", "circle", "en", size="large")
    'the large red circle'
    >>> object_phrase("red", "circle", "zh", size="large")
    '红色的大圆形'
    >>> object_phrase("red", "circle", "en", position="left", article="")
    'red circle on the left'

    `kind=None` gives "object"/"图形"; `colour=None` drops the colour; article "a" becomes "an"
    before a vowel. `position` is one of
    left/right/top/bottom.
    """
    if lang == "en":
        words = [article, size, colour_name(colour, "en") if colour else None,
                 shape_name(kind, "en") if kind else "object"]
        words = [w for w in words if w]
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        phrase = " ".join(words)
        if position:
            phrase += {"left": " on the left", "right": " on the right",
                       "top": " at the top", "bottom": " at the bottom"}[position]
        return phrase
    noun = shape_name(kind, "zh") if kind else "图形"
    if position and size is None:  # 左边的红色圆形, not 左边的红色的圆形
        noun = (colour_name(colour, "zh") if colour else "") + noun
    elif size == "medium":
        noun = "中等大小的" + (colour_name(colour, "zh") if colour else "") + noun
    else:
        noun = {"large": "大", "small": "小", None: ""}[size] + noun
        noun = (colour_name(colour, "zh") + "的" + noun) if colour else noun
    if position:
        noun = {"left": "左边的", "right": "右边的", "top": "上面的", "bottom": "下面的"}[position] + noun
    return noun


def counted_phrase(n: int, colour: str | None, kind: str, lang: str, size: str | None = None) -> str:
    """e.g. counted_phrase(2, "red", "cross", "en") == "two red crosses";
    counted_phrase(2, "red", "cross", "zh") == "两个红色的十字"."""
    if lang == "en":
        article = ("an" if (size or colour or kind)[0] in "aeiou" else "a") if n == 1 else en_count(n)
        words = [article, size, colour_name(colour, "en") if colour else None, shape_name(kind, "en", n != 1)]
        return " ".join(w for w in words if w)
    return zh_count(n) + "个" + object_phrase(colour, kind, "zh", size=size)


def join_list(items: list[str], lang: str) -> str:
    """e.g. join_list(["a", "b", "c"], "en") == "a, b and c"; join_list(["甲", "乙", "丙"], "zh") == "甲、乙和丙"."""
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    sep = ", " if lang == "en" else "、"
    last = " and " if lang == "en" else "和"
    return sep.join(items[:-1]) + last + items[-1]


def text_phrase(text: str, lang_of_text: str, lang: str) -> str:
    """How a caption mentions a rendered text, e.g. text_phrase("42", "num", "en") == 'the number 42'."""
    if lang == "en":
        return f"the number {text}" if lang_of_text == "num" else f'the word "{text}"'
    return f"数字{text}" if lang_of_text == "num" else f"“{text}”这个词"


def picture_name(k: int, lang: str) -> str:
    """Answer naming the k-th (1-based) picture, e.g. picture_name(2, "zh") == "第二张图片"."""
    return f"Picture {k}" if lang == "en" else f"第{zh_number(k)}张图片"
