//! Where each tile goes for a given set of participants: a pure function, so the rules
//! (grid for cameras; a screen share takes the stage with cameras in a column beside it) are
//! unit-tested without rendering anything.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TileKind {
    Camera,
    Screen,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tile {
    pub participant_id: String,
    pub kind: TileKind,
    pub rect: Rect,
}

/// Gap between tiles, so neighbouring tiles of similar content stay distinguishable.
const GAP: u32 = 4;

/// Tiles for `participants` (in display order) on a `width`×`height` canvas; `screen` names
/// the participant whose screen share, if any, takes the stage.
pub fn layout(width: u32, height: u32, participants: &[&str], screen: Option<&str>) -> Vec<Tile> {
    let mut tiles = Vec::new();
    match screen {
        Some(sharer) => {
            // The stage keeps most of the width; cameras stack in the right column.
            let n = participants.len() as u32;
            let column_w = if n == 0 { 0 } else { even(width / 4) };
            let stage = Rect {
                x: 0,
                y: 0,
                w: width - column_w,
                h: height,
            };
            tiles.push(Tile {
                participant_id: sharer.to_string(),
                kind: TileKind::Screen,
                rect: inset(stage),
            });
            if let Some(per_camera) = height.checked_div(n) {
                let cell_h = per_camera.min(column_w * 9 / 16 + GAP * 2);
                let top = (height - cell_h * n) / 2;
                for (i, p) in participants.iter().enumerate() {
                    let cell = Rect {
                        x: width - column_w,
                        y: top + cell_h * i as u32,
                        w: column_w,
                        h: cell_h,
                    };
                    tiles.push(Tile {
                        participant_id: p.to_string(),
                        kind: TileKind::Camera,
                        rect: inset(cell),
                    });
                }
            }
        }
        None => {
            let n = participants.len() as u32;
            if n == 0 {
                return tiles;
            }
            let cols = (1..=n).find(|c| c * c >= n).unwrap();
            let rows = n.div_ceil(cols);
            let cell_w = width / cols;
            let cell_h = height / rows;
            let grid_top = (height - cell_h * rows) / 2;
            for (i, p) in participants.iter().enumerate() {
                let i = i as u32;
                let row = i / cols;
                let col = i % cols;
                // An incomplete last row is centred.
                let in_row = if row == rows - 1 {
                    n - row * cols
                } else {
                    cols
                };
                let row_left = (width - cell_w * in_row) / 2;
                let cell = Rect {
                    x: row_left + col * cell_w,
                    y: grid_top + row * cell_h,
                    w: cell_w,
                    h: cell_h,
                };
                tiles.push(Tile {
                    participant_id: p.to_string(),
                    kind: TileKind::Camera,
                    rect: inset(cell),
                });
            }
        }
    }
    tiles
}

fn even(v: u32) -> u32 {
    v & !1
}

/// Shrinks a cell by the gap and keeps every edge even, as yuv420p overlays want.
fn inset(r: Rect) -> Rect {
    Rect {
        x: even(r.x + GAP / 2),
        y: even(r.y + GAP / 2),
        w: even(r.w.saturating_sub(GAP)).max(2),
        h: even(r.h.saturating_sub(GAP)).max(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlaps(a: &Rect, b: &Rect) -> bool {
        a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h
    }

    fn check_disjoint_inside(tiles: &[Tile], w: u32, h: u32) {
        for (i, a) in tiles.iter().enumerate() {
            assert!(
                a.rect.x + a.rect.w <= w && a.rect.y + a.rect.h <= h,
                "{a:?} outside"
            );
            for b in &tiles[i + 1..] {
                assert!(!overlaps(&a.rect, &b.rect), "{a:?} overlaps {b:?}");
            }
        }
    }

    #[test]
    fn one_participant_fills_the_frame() {
        let t = layout(1280, 720, &["a"], None);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t[0].rect,
            Rect {
                x: 2,
                y: 2,
                w: 1276,
                h: 716
            }
        );
    }

    #[test]
    fn grid_shapes() {
        for n in 1..=9u32 {
            let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
            let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
            let t = layout(1280, 720, &refs, None);
            assert_eq!(t.len(), n as usize);
            check_disjoint_inside(&t, 1280, 720);
        }
        let t = layout(1280, 720, &["a", "b"], None);
        // two side by side, each half the width
        assert_eq!(t[0].rect.y, t[1].rect.y);
        assert!(t[0].rect.x < t[1].rect.x);
        assert_eq!(t[0].rect.w, 636);
        // three: two on top, one centred below
        let t = layout(1280, 720, &["a", "b", "c"], None);
        assert_eq!(t[2].rect.x, 320 + 2);
        assert!(t[2].rect.y > t[0].rect.y);
    }

    #[test]
    fn screen_share_takes_the_stage() {
        let t = layout(1280, 720, &["a", "b"], Some("b"));
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].kind, TileKind::Screen);
        assert_eq!(t[0].participant_id, "b");
        assert!(t[0].rect.w >= 900);
        assert!(t[1..]
            .iter()
            .all(|c| c.kind == TileKind::Camera && c.rect.x >= t[0].rect.w));
        check_disjoint_inside(&t, 1280, 720);
        assert!(layout(1280, 720, &[], None).is_empty());
    }
}
