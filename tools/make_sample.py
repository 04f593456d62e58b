"""Generate the embedded sample: data/sample/ko_sample.jsonl and data/sample/images/.

Run from the repository root::

    python -m tools.make_sample [OUT_DIR]   # default data/sample

The sample has 42 lines in the WanJuan-SiLu record schema. 34 records point
at simple drawn scenes (shapes, colours, Latin text) with Korean captions that
describe them. The other 8 lines must be dropped by a later stage:

- download: a missing file, a Russian record, a blank line, an invalid JSON line;
- filter: a truncated JPEG, a 10x10 image, a 640x30 strip (aspect ratio 21.3), and a byte-identical
  copy of another image under a new id.

Output is deterministic for a given Pillow version: no randomness without a
fixed seed, no timestamps, no EXIF. JPEG bytes can differ between libjpeg
builds, so regenerate only when the scenes change, and commit the result.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Color = tuple[int, int, int]
SKY: Color = (135, 196, 235)
GRASS: Color = (92, 170, 72)
SEA: Color = (28, 84, 160)
WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
RED: Color = (214, 40, 40)
YELLOW: Color = (247, 209, 50)
GREEN: Color = (40, 150, 60)
BLUE: Color = (40, 90, 200)
BROWN: Color = (120, 72, 36)
GREY: Color = (150, 150, 150)
ORANGE: Color = (240, 140, 40)
PURPLE: Color = (130, 60, 170)
PINK: Color = (244, 170, 190)
NAVY: Color = (18, 28, 70)

ART = {"level1": ["艺术类"], "level2": ["抽象图形"]}
NATURE = {"level1": ["自然类"], "level2": ["自然风光"]}
LIFE = {"level1": ["生活类"], "level2": ["日常用品"]}
SIGN = {"level1": ["文化类"], "level2": ["标志符号"]}
TRAFFIC = {"level1": ["交通类"], "level2": ["道路交通"]}


@dataclass(frozen=True)
class Scene:
    """One sample image: its file, size, how it is drawn, and the caption describing it."""

    file: str  # relative to the images folder
    size: tuple[int, int]  # width, height in pixels
    draw: Callable[[ImageDraw.ImageDraw, int, int], None]
    caption: str
    categories: dict[str, list[str]]
    background: Color | None = WHITE  # None: transparent (RGBA)
    image_format: str = "JPEG"  # JPEG, PNG or WEBP


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def centered_text(d: ImageDraw.ImageDraw, w: int, h: int, text: str, size: int, fill: Color) -> None:
    d.text((w / 2, h / 2), text, fill=fill, font=font(size), anchor="mm")


def ground(d: ImageDraw.ImageDraw, w: int, h: int, top: float, fill: Color) -> None:
    d.rectangle([0, int(h * top), w, h], fill=fill)


# --------------------------------------------------------------------------- scenes


def red_circle(d, w, h):
    r = min(w, h) // 4
    d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=RED)


def house(d, w, h):
    ground(d, w, h, 0.7, GRASS)
    left, right, base = w * 0.3, w * 0.7, h * 0.75
    d.rectangle([left, h * 0.45, right, base], fill=YELLOW)
    d.polygon([(left - 15, h * 0.45), (w / 2, h * 0.2), (right + 15, h * 0.45)], fill=RED)
    d.rectangle([w * 0.46, h * 0.58, w * 0.54, base], fill=BROWN)


def sunset_sea(d, w, h):
    d.rectangle([0, 0, w, h / 2], fill=ORANGE)
    r = min(w, h) // 6
    d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=YELLOW)
    ground(d, w, h, 0.5, SEA)


def three_triangles(d, w, h):
    for i in range(3):
        cx = w * (i + 1) / 4
        d.polygon([(cx - w / 10, h * 0.7), (cx, h * 0.3), (cx + w / 10, h * 0.7)], fill=GREEN)


def tree(d, w, h):
    ground(d, w, h, 0.75, GRASS)
    d.rectangle([w * 0.46, h * 0.45, w * 0.54, h * 0.8], fill=BROWN)
    r = min(w, h) * 0.2
    d.ellipse([w / 2 - r, h * 0.45 - 1.5 * r, w / 2 + r, h * 0.45 + 0.5 * r], fill=GREEN)


def traffic_light(d, w, h):
    d.rounded_rectangle([w * 0.38, h * 0.1, w * 0.62, h * 0.9], radius=12, fill=BLACK)
    r = min(w * 0.09, h * 0.1)
    for i, color in enumerate((RED, YELLOW, GREEN)):
        cy = h * (0.25 + 0.25 * i)
        d.ellipse([w / 2 - r, cy - r, w / 2 + r, cy + r], fill=color)


def snowman(d, w, h):
    rng = random.Random(7)
    for _ in range(40):
        x, y = rng.randrange(w), rng.randrange(h)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=WHITE)
    ground(d, w, h, 0.85, WHITE)
    d.ellipse([w / 2 - 70, h * 0.5, w / 2 + 70, h * 0.5 + 140], fill=WHITE)
    d.ellipse([w / 2 - 45, h * 0.5 - 80, w / 2 + 45, h * 0.5 + 10], fill=WHITE)
    d.polygon([(w / 2, h * 0.5 - 38), (w / 2 + 30, h * 0.5 - 32), (w / 2, h * 0.5 - 26)], fill=ORANGE)


def checkerboard(d, w, h):
    cell = min(w, h) // 8
    for row in range(8):
        for col in range(8):
            if (row + col) % 2:
                d.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1], fill=BLACK)


def rainbow(d, w, h):
    colors = [RED, ORANGE, YELLOW, GREEN, BLUE, NAVY, PURPLE]
    band = h / len(colors)
    for i, color in enumerate(colors):
        d.rectangle([0, i * band, w, (i + 1) * band], fill=color)


def open_sign(d, w, h):
    d.rectangle([w * 0.1, h * 0.25, w * 0.9, h * 0.75], outline=BLACK, width=6)
    centered_text(d, w, h, "OPEN", h // 5, BLACK)


def stop_sign(d, w, h):
    r = min(w, h) * 0.4
    points = [
        (w / 2 + r * math.cos(math.radians(22.5 + 45 * i)), h / 2 + r * math.sin(math.radians(22.5 + 45 * i)))
        for i in range(8)
    ]
    d.polygon(points, fill=RED)
    centered_text(d, w, h, "STOP", int(r / 2.2), WHITE)


def mountains(d, w, h):
    ground(d, w, h, 0.85, GRASS)
    for cx, top in ((w * 0.35, h * 0.2), (w * 0.68, h * 0.3)):
        d.polygon([(cx - w * 0.3, h * 0.86), (cx, top), (cx + w * 0.3, h * 0.86)], fill=(96, 110, 100))
        d.polygon([(cx - w * 0.06, top + h * 0.1), (cx, top), (cx + w * 0.06, top + h * 0.1)], fill=WHITE)


def moon_stars(d, w, h):
    r = min(w, h) * 0.18
    d.ellipse([w * 0.3 - r, h * 0.35 - r, w * 0.3 + r, h * 0.35 + r], fill=YELLOW)
    d.ellipse([w * 0.3 - r + 25, h * 0.35 - r - 10, w * 0.3 + r + 25, h * 0.35 + r - 10], fill=NAVY)
    rng = random.Random(13)
    for _ in range(25):
        x, y = rng.randrange(w // 2, w), rng.randrange(h)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=WHITE)


def blue_square(d, w, h):
    side = min(w, h) * 0.4
    d.rectangle([w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2], fill=BLUE)


def purple_circles(d, w, h):
    x = w * 0.08
    for r in (40, 32, 25, 19, 14):
        d.ellipse([x, h / 2 - r, x + 2 * r, h / 2 + r], fill=PURPLE)
        x += 2 * r + 22


def pennant(d, w, h):
    d.rectangle([w * 0.3, h * 0.15, w * 0.32, h * 0.95], fill=BROWN)
    d.polygon([(w * 0.32, h * 0.15), (w * 0.7, h * 0.25), (w * 0.32, h * 0.35)], fill=GREEN)


def car(d, w, h):
    ground(d, w, h, 0.7, (90, 90, 90))
    d.rectangle([w * 0.2, h * 0.45, w * 0.8, h * 0.68], fill=RED)
    d.rectangle([w * 0.32, h * 0.3, w * 0.65, h * 0.46], fill=RED)
    for cx in (w * 0.32, w * 0.68):
        d.ellipse([cx - 28, h * 0.68 - 28, cx + 28, h * 0.68 + 28], fill=BLACK)


def balloons(d, w, h):
    for i, color in enumerate((RED, YELLOW, BLUE)):
        cx, cy = w * (0.3 + 0.2 * i), h * (0.3 + 0.05 * (i % 2))
        d.ellipse([cx - 35, cy - 45, cx + 35, cy + 45], fill=color)
        d.line([(cx, cy + 45), (w / 2, h * 0.9)], fill=BLACK, width=2)


def flower(d, w, h):
    cx, cy = w / 2, h * 0.4
    d.line([(cx, cy), (cx, h * 0.95)], fill=GREEN, width=8)
    for i in range(6):
        angle = math.radians(60 * i)
        px, py = cx + 45 * math.cos(angle), cy + 45 * math.sin(angle)
        d.ellipse([px - 28, py - 28, px + 28, py + 28], fill=PINK)
    d.ellipse([cx - 24, cy - 24, cx + 24, cy + 24], fill=YELLOW)


def dot_grid(d, w, h):
    for row in range(5):
        for col in range(5):
            x, y = w * (col + 1) / 6, h * (row + 1) / 6
            d.ellipse([x - 8, y - 8, x + 8, y + 8], fill=WHITE)


def warning_stripes(d, w, h):
    step = 40
    for x in range(-h, w + h, 2 * step):
        d.polygon([(x, h), (x + step, h), (x + step + h, 0), (x + h, 0)], fill=BLACK)


def year_text(d, w, h):
    centered_text(d, w, h, "2025", h // 3, NAVY)


def cafe_sign(d, w, h):
    d.rounded_rectangle([w * 0.1, h * 0.2, w * 0.9, h * 0.8], radius=20, fill=BROWN)
    centered_text(d, w, h, "CAFE", h // 4, WHITE)


def sailboat(d, w, h):
    ground(d, w, h, 0.6, SEA)
    d.polygon([(w * 0.3, h * 0.62), (w * 0.7, h * 0.62), (w * 0.62, h * 0.72), (w * 0.38, h * 0.72)], fill=BROWN)
    d.polygon([(w * 0.5, h * 0.2), (w * 0.5, h * 0.6), (w * 0.3, h * 0.6)], fill=WHITE)


def fish(d, w, h):
    cx, cy = w * 0.45, h / 2
    d.ellipse([cx - 70, cy - 40, cx + 70, cy + 40], fill=ORANGE)
    d.polygon([(cx - 60, cy), (cx - 115, cy - 40), (cx - 115, cy + 40)], fill=ORANGE)
    d.ellipse([cx + 35, cy - 15, cx + 47, cy - 3], fill=BLACK)
    for i, r in enumerate((6, 9, 12)):
        d.ellipse([cx + 95 + 10 * i - r, cy - 50 - 40 * i - r, cx + 95 + 10 * i + r, cy - 50 - 40 * i + r],
                  outline=WHITE, width=2)


def heart(d, w, h):
    r = min(w, h) * 0.14
    cx, cy = w / 2, h * 0.42
    d.ellipse([cx - 2 * r, cy - r, cx, cy + r], fill=RED)
    d.ellipse([cx, cy - r, cx + 2 * r, cy + r], fill=RED)
    d.polygon([(cx - 1.95 * r, cy + 0.3 * r), (cx + 1.95 * r, cy + 0.3 * r), (cx, cy + 2.4 * r)], fill=RED)


def target(d, w, h):
    for i, r in enumerate(range(int(min(w, h) * 0.45), 0, -int(min(w, h) * 0.09))):
        d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=RED if i % 2 == 0 else WHITE)


def bar_chart(d, w, h):
    d.line([(w * 0.1, h * 0.1), (w * 0.1, h * 0.9), (w * 0.92, h * 0.9)], fill=BLACK, width=3)
    for i, (height, color) in enumerate(((0.4, BLUE), (0.7, GREEN), (0.3, ORANGE), (0.55, RED))):
        x = w * (0.18 + 0.19 * i)
        d.rectangle([x, h * (0.9 - height), x + w * 0.12, h * 0.9], fill=color)


def window(d, w, h):
    d.rectangle([w * 0.3, h * 0.2, w * 0.7, h * 0.8], fill=WHITE)
    d.rectangle([w * 0.32, h * 0.23, w * 0.68, h * 0.77], fill=(90, 150, 220))
    d.line([(w / 2, h * 0.23), (w / 2, h * 0.77)], fill=WHITE, width=8)
    d.line([(w * 0.32, h / 2), (w * 0.68, h / 2)], fill=WHITE, width=8)


def clouds(d, w, h):
    for cx, cy, s in ((w * 0.25, h * 0.3, 1.0), (w * 0.7, h * 0.5, 0.8), (w * 0.4, h * 0.75, 0.6)):
        for dx, dy, r in ((-40, 0, 30), (0, -15, 40), (40, 0, 30)):
            d.ellipse([cx + s * (dx - r), cy + s * (dy - r), cx + s * (dx + r), cy + s * (dy + r)], fill=WHITE)


def umbrella(d, w, h):
    for x in range(0, w, 24):
        d.line([(x, 0), (x - 20, h)], fill=(200, 200, 210), width=2)
    r = min(w, h) * 0.3
    d.pieslice([w / 2 - r, h * 0.4 - r, w / 2 + r, h * 0.4 + r], 180, 360, fill=RED)
    d.line([(w / 2, h * 0.4), (w / 2, h * 0.8)], fill=BLACK, width=5)
    d.arc([w / 2 - 20, h * 0.8 - 20, w / 2, h * 0.8 + 10], 0, 180, fill=BLACK, width=5)


def smiley(d, w, h):
    r = min(w, h) * 0.38
    d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=YELLOW, outline=BLACK, width=3)
    for ex in (-0.35, 0.35):
        d.ellipse([w / 2 + ex * r - 10, h / 2 - 0.3 * r - 14, w / 2 + ex * r + 10, h / 2 - 0.3 * r + 14], fill=BLACK)
    d.arc([w / 2 - 0.55 * r, h / 2 - 0.4 * r, w / 2 + 0.55 * r, h / 2 + 0.55 * r], 20, 160, fill=BLACK, width=6)


def arrow(d, w, h):
    d.rectangle([w * 0.15, h * 0.42, w * 0.6, h * 0.58], fill=WHITE)
    d.polygon([(w * 0.6, h * 0.25), (w * 0.85, h / 2), (w * 0.6, h * 0.75)], fill=WHITE)


def icon_circle(d, w, h):
    r = min(w, h) * 0.35
    d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=BLUE + (255,))


def lighthouse(d, w, h):
    ground(d, w, h, 0.7, SEA)
    d.polygon([(0, h * 0.7), (w * 0.55, h * 0.7), (w * 0.45, h * 0.55), (0, h * 0.5)], fill=(110, 100, 90))
    d.polygon([(w * 0.2, h * 0.52), (w * 0.3, h * 0.52), (w * 0.28, h * 0.15), (w * 0.22, h * 0.15)], fill=WHITE)
    d.rectangle([w * 0.21, h * 0.1, w * 0.29, h * 0.15], fill=YELLOW)


def red_dot(d, w, h):
    d.rectangle([2, 2, w - 3, h - 3], fill=RED)


def blue_strip(d, w, h):
    d.rectangle([0, h * 0.25, w, h * 0.75], fill=BLUE)


SCENES: list[Scene] = [
    Scene("sky_red_circle.jpg", (480, 360), red_circle, "파란 하늘 아래 빨간 원이 하나 떠 있는 그림이다.", ART, SKY),
    Scene("house.jpg", (512, 384), house, "초록 풀밭 위에 빨간 지붕을 얹은 노란 집 한 채가 서 있다.", LIFE, SKY),
    Scene("sunset_sea.jpg", (640, 360), sunset_sea, "주황빛 노을 아래 짙은 파란 바다 위로 노란 해가 걸려 있다.", NATURE),
    Scene("three_triangles.png", (400, 300), three_triangles, "노란 바탕에 초록색 삼각형 세 개가 나란히 놓여 있다.", ART,
          YELLOW, "PNG"),
    Scene("tree.jpg", (360, 480), tree, "맑은 하늘 아래 풀밭에 둥근 초록 잎을 가진 나무 한 그루가 서 있다.", NATURE, SKY),
    Scene("signs/traffic_light.jpg", (300, 420), traffic_light,
          "회색 배경 앞에 빨강, 노랑, 초록 불이 위에서부터 차례로 달린 신호등이 있다.", TRAFFIC, GREY),
    Scene("snowman.jpg", (400, 400), snowman, "눈이 내리는 파란 밤하늘 아래 하얀 눈사람이 서 있다.", NATURE, (40, 60, 130)),
    Scene("checkerboard.png", (320, 320), checkerboard, "검은색과 흰색 칸이 번갈아 놓인 체스판 무늬이다.", ART, WHITE, "PNG"),
    Scene("rainbow.jpg", (560, 350), rainbow, "빨강부터 보라까지 일곱 가지 색 띠가 가로로 이어진 무지개 줄무늬이다.", ART),
    Scene("signs/open.jpg", (480, 300), open_sign, "흰 바탕에 검은 글씨로 OPEN이라고 쓰인 간판 그림이다.", SIGN),
    Scene("signs/stop.jpg", (400, 400), stop_sign, "빨간 팔각형 안에 흰 글씨로 STOP이라고 적힌 정지 표지판이다.", TRAFFIC,
          (220, 220, 220)),
    Scene("mountains.jpg", (640, 400), mountains, "파란 하늘 아래 꼭대기에 눈이 쌓인 봉우리 두 개가 솟아 있다.", NATURE, SKY),
    Scene("moon_stars.jpg", (480, 320), moon_stars, "짙은 남색 밤하늘에 노란 초승달과 작은 별들이 떠 있다.", NATURE, NAVY),
    Scene("blue_square.jpg", (300, 300), blue_square, "분홍색 배경 한가운데에 파란 정사각형이 놓여 있다.", ART, PINK),
    Scene("purple_circles.jpg", (520, 200), purple_circles,
          "흰 바탕 위에 크기가 점점 작아지는 보라색 원 다섯 개가 한 줄로 늘어서 있다.", ART),
    Scene("pennant.jpg", (360, 360), pennant, "하늘을 배경으로 깃대 끝에 초록색 삼각 깃발이 달려 있다.", SIGN, SKY),
    Scene("car.jpg", (560, 320), car, "회색 도로 위에 검은 바퀴 두 개가 달린 빨간 자동차가 서 있다.", TRAFFIC, SKY),
    Scene("balloons.jpg", (400, 500), balloons, "빨강, 노랑, 파랑 풍선 세 개가 줄에 매달려 하늘로 떠오르고 있다.", LIFE, SKY),
    Scene("flower.jpg", (360, 440), flower, "연두색 바탕에 노란 꽃술과 분홍 꽃잎을 가진 꽃 한 송이가 피어 있다.", NATURE,
          (200, 235, 160)),
    Scene("dot_grid.png", (300, 300), dot_grid, "검은 배경 위에 흰 점들이 가로세로 다섯 줄씩 고르게 찍혀 있다.", ART,
          BLACK, "PNG"),
    Scene("signs/warning_stripes.jpg", (480, 240), warning_stripes,
          "노란색과 검은색 사선 줄무늬가 번갈아 그려진 경고 무늬이다.", SIGN, YELLOW),
    Scene("year_2025.jpg", (500, 260), year_text, "하늘색 바탕에 남색 숫자로 2025가 크게 쓰여 있다.", SIGN, (190, 225, 245)),
    Scene("signs/cafe.jpg", (440, 300), cafe_sign, "갈색 나무판 위에 흰 글씨로 CAFE라고 쓰인 카페 간판이다.", SIGN,
          (235, 225, 205)),
    Scene("sailboat.jpg", (600, 400), sailboat, "잔잔한 파란 바다 위에 흰 돛을 단 갈색 돛단배 한 척이 떠 있다.", NATURE, SKY),
    Scene("fish.jpg", (480, 320), fish, "푸른 물속에서 주황색 물고기 한 마리가 거품을 내며 헤엄치고 있다.", NATURE,
          (40, 120, 190)),
    Scene("heart.jpg", (360, 320), heart, "흰 바탕 가운데에 빨간 하트 모양이 그려져 있다.", ART),
    Scene("target.jpg", (400, 400), target, "빨간색과 흰색 동그라미가 겹겹이 그려진 과녁 무늬이다.", ART),
    Scene("bar_chart.png", (480, 360), bar_chart, "흰 바탕에 높이가 서로 다른 막대 네 개로 된 막대그래프가 그려져 있다.", LIFE,
          WHITE, "PNG"),
    Scene("window.jpg", (400, 440), window, "붉은 벽돌색 벽에 흰 창틀이 달린 파란 유리창이 나 있다.", LIFE, (160, 70, 50)),
    Scene("clouds.webp", (560, 360), clouds, "파란 하늘에 하얀 구름 세 덩이가 떠 있다.", NATURE, SKY, "WEBP"),
    Scene("umbrella.jpg", (420, 420), umbrella, "회색 빗줄기 속에 빨간 우산 하나가 펼쳐져 있다.", LIFE, (120, 125, 135)),
    Scene("smiley.jpg", (320, 320), smiley, "흰 바탕에 두 눈과 웃는 입이 그려진 노란 웃는 얼굴이 있다.", ART),
    Scene("signs/arrow.jpg", (480, 280), arrow, "초록색 바탕에 오른쪽을 가리키는 흰 화살표가 그려져 있다.", TRAFFIC, GREEN),
    Scene("icon_circle.png", (256, 256), icon_circle, "투명한 배경 위에 파란 동그라미 하나만 그려진 단순한 아이콘이다.", ART,
          None, "PNG"),
]

# Images that download keeps and the filter stage must drop.
TRUNCATED = Scene("lighthouse_truncated.jpg", (480, 360), lighthouse, "바닷가 절벽 위에 하얀 등대가 서 있다.", NATURE, SKY)
TINY = Scene("tiny_dot.png", (10, 10), red_dot, "아주 작은 빨간 점 하나가 찍혀 있다.", ART, WHITE, "PNG")
STRIP = Scene("thin_strip.jpg", (640, 30), blue_strip, "가늘고 긴 파란 띠 하나가 가로로 그어져 있다.", ART)


def render(scene: Scene) -> bytes:
    """Draw ``scene`` and return the encoded file bytes."""
    width, height = scene.size
    if scene.background is None:
        image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    else:
        image = Image.new("RGB", (width, height), scene.background)
    scene.draw(ImageDraw.Draw(image), width, height)
    buffer = io.BytesIO()
    if scene.image_format == "JPEG":
        image.save(buffer, "JPEG", quality=85)
    elif scene.image_format == "PNG":
        image.save(buffer, "PNG", optimize=True)
    else:
        image.save(buffer, "WEBP", quality=80, method=6)
    return buffer.getvalue()


def img_id(name: str) -> str:
    """Return a 64-hex id like the real data's, derived from ``name``."""
    return hashlib.sha256(f"silu-sample:{name}".encode()).hexdigest()


def record(
    name: str, path: str, caption: str, categories: dict[str, list[str]], data: bytes | None,
    size: tuple[int, int], image_format: str, lang: str = "ko",
) -> str:
    entry = {
        "img_id": img_id(name),
        "image": {
            "path": path,
            "resolution": list(size),
            "size": round(len(data) / 1024, 2) if data is not None else 153.2,
            "format": image_format,
        },
        "captions": {"content": caption, "lang": lang},
        "labels": {"pjwk_cates": categories},
    }
    return json.dumps(entry, ensure_ascii=False)


def build(out_dir: Path) -> None:
    """Write the sample JSONL and images under ``out_dir``, replacing earlier output."""
    images = out_dir / "images"
    shutil.rmtree(images, ignore_errors=True)

    def save(path: str, data: bytes) -> None:
        target = images / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)

    lines = []
    for scene in SCENES:
        data = render(scene)
        save(scene.file, data)
        lines.append(record(scene.file, scene.file, scene.caption, scene.categories, data, scene.size,
                            scene.image_format))

    first = SCENES[0]
    first_data = render(first)
    truncated = render(TRUNCATED)
    truncated = truncated[: len(truncated) * 6 // 10]
    save(TRUNCATED.file, truncated)
    tiny = render(TINY)
    save(TINY.file, tiny)
    strip = render(STRIP)
    save(STRIP.file, strip)
    save("sky_red_circle_copy.jpg", first_data)

    # Lines that a later stage must drop, spread through the file.
    extra = {
        3: record(TRUNCATED.file, TRUNCATED.file, TRUNCATED.caption, NATURE, truncated, TRUNCATED.size, "JPEG"),
        6: "",  # blank line
        9: record("missing", "missing/harbour_photo.jpg", "항구에 작은 어선 여러 척이 정박해 있다.", NATURE, None,
                  (800, 600), "JPEG"),
        14: record(TINY.file, TINY.file, TINY.caption, ART, tiny, TINY.size, "PNG"),
        18: '{"img_id": "' + img_id("broken-json") + '", "image": {"path": "tree.jpg", "resolution": [360, 480]',
        23: record(STRIP.file, STRIP.file, STRIP.caption, ART, strip, STRIP.size, "JPEG"),
        28: record("sky_red_circle_copy.jpg", "sky_red_circle_copy.jpg", "하늘색 배경 가운데에 빨간 동그라미가 있다.", ART,
                   first_data, first.size, "JPEG"),
        33: record("russian", first.file, "Красный круг на голубом небе.", ART, first_data, first.size, "JPEG",
                   lang="ru"),
    }
    merged: list[str] = []
    for line in lines:
        while len(merged) in extra:
            merged.append(extra.pop(len(merged)))
        merged.append(line)
    merged.extend(extra[key] for key in sorted(extra))
    (out_dir / "ko_sample.jsonl").write_text("\n".join(merged) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else Path("data/sample")
    out_dir.mkdir(parents=True, exist_ok=True)
    build(out_dir)
    total = sum(path.stat().st_size for path in (out_dir / "images").rglob("*") if path.is_file())
    print(f"wrote {out_dir / 'ko_sample.jsonl'} and {total / 1024:.0f} KiB of images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
