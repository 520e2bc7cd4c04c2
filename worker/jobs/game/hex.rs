//! Hex on an n×n rhombus (n ≤ 8): the small, real two-player game the reference jobs play.
//!
//! Pure rules, no I/O. Player 1 connects the top row to the bottom row, player 2 the left column to
//! the right column; a full board always has exactly one winner, so there are no draws. The board is
//! two 64-bit bitboards, which makes a position `Copy`, a move O(1) and the connection checks a few
//! shifts per step: the policy evaluates every legal move of every turn, in debug builds too.
//!
//! Cell `r * n + c` is row `r` (0 = top), column `c` (0 = left). Its six neighbours are
//! `(r, c±1)`, `(r±1, c)`, `(r-1, c+1)` and `(r+1, c-1)`.

use thiserror::Error;

/// The largest supported side: n² cells must fit a `u64`.
pub const MAX_SIZE: usize = 8;

/// Length of [`Hex::features`] for a board of side `size`: own stones, opponent stones (one-hot per
/// cell, in the mover's frame), a bias, and the two shortest-connection distances.
pub const fn feature_len(size: usize) -> usize {
    2 * size * size + EXTRA_FEATURES
}

/// Bias, own distance, opponent distance.
const EXTRA_FEATURES: usize = 3;

/// Why a move was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MoveError {
    #[error("the game is already over")]
    GameOver,
    #[error("cell {cell} is off the board (0..{cells})")]
    OffBoard { cell: usize, cells: usize },
    #[error("cell {cell} is already occupied")]
    Occupied { cell: usize },
}

/// Precomputed masks of one board size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: u32,
    board: u64,
    first_col: u64,
    last_col: u64,
    first_row: u64,
    last_row: u64,
}

impl Geometry {
    fn new(n: usize) -> Geometry {
        let mut g = Geometry {
            n: n as u32,
            board: 0,
            first_col: 0,
            last_col: 0,
            first_row: 0,
            last_row: 0,
        };
        for r in 0..n {
            for c in 0..n {
                let bit = 1u64 << (r * n + c);
                g.board |= bit;
                if c == 0 {
                    g.first_col |= bit;
                }
                if c == n - 1 {
                    g.last_col |= bit;
                }
                if r == 0 {
                    g.first_row |= bit;
                }
                if r == n - 1 {
                    g.last_row |= bit;
                }
            }
        }
        g
    }

    /// Every cell adjacent to a cell of `x`.
    fn neighbours(&self, x: u64) -> u64 {
        let n = self.n;
        let not_last = x & !self.last_col;
        let not_first = x & !self.first_col;
        let up_right = if n > 1 { not_last >> (n - 1) } else { 0 };
        let down_left = if n > 1 { not_first << (n - 1) } else { 0 };
        ((not_last << 1) | (not_first >> 1) | (x << n) | (x >> n) | up_right | down_left)
            & self.board
    }

    /// `x` grown through the cells of `through` until nothing more connects.
    fn flood(&self, mut x: u64, through: u64) -> u64 {
        loop {
            let grown = x | (self.neighbours(x) & through);
            if grown == x {
                return x;
            }
            x = grown;
        }
    }

    /// (start edge, end edge) of `player`.
    fn edges(&self, player: u8) -> (u64, u64) {
        if player == 1 {
            (self.first_row, self.last_row)
        } else {
            (self.first_col, self.last_col)
        }
    }
}

/// A position: whose turn, the stones, and the winner once there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex {
    geo: Geometry,
    /// Stones of player 1 and player 2.
    stones: [u64; 2],
    to_move: u8,
    moves: u16,
    winner: Option<u8>,
}

impl Hex {
    /// The empty board of side `size`, player 1 to move. Panics unless `1 <= size <= 8`; sizes come
    /// from a validated [`super::GameConfig`].
    pub fn new(size: usize) -> Hex {
        assert!(
            (1..=MAX_SIZE).contains(&size),
            "hex board size must be 1..=8, got {size}"
        );
        Hex {
            geo: Geometry::new(size),
            stones: [0, 0],
            to_move: 1,
            moves: 0,
            winner: None,
        }
    }

    /// Side length n.
    pub fn size(&self) -> usize {
        self.geo.n as usize
    }

    /// Number of cells, n².
    pub fn cells(&self) -> usize {
        self.size() * self.size()
    }

    /// The player to move (1 or 2); still alternates after the game ended.
    pub fn side_to_move(&self) -> u8 {
        self.to_move
    }

    /// Moves played so far.
    pub fn move_count(&self) -> usize {
        usize::from(self.moves)
    }

    /// The winner (1 or 2), once somebody has connected their edges.
    pub fn winner(&self) -> Option<u8> {
        self.winner
    }

    pub fn is_over(&self) -> bool {
        self.winner.is_some()
    }

    /// 0 for an empty cell, else the player whose stone is there. Panics off the board.
    pub fn cell(&self, cell: usize) -> u8 {
        assert!(cell < self.cells(), "cell {cell} is off the board");
        let bit = 1u64 << cell;
        if self.stones[0] & bit != 0 {
            1
        } else if self.stones[1] & bit != 0 {
            2
        } else {
            0
        }
    }

    /// Bitboard of the empty cells.
    fn empty(&self) -> u64 {
        self.geo.board & !(self.stones[0] | self.stones[1])
    }

    /// The legal moves, in cell order (none once the game is over).
    pub fn legal_moves(&self) -> impl Iterator<Item = usize> + use<> {
        let mut rest = if self.is_over() { 0 } else { self.empty() };
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let cell = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            Some(cell)
        })
    }

    /// Number of legal moves.
    pub fn legal_move_count(&self) -> usize {
        if self.is_over() {
            0
        } else {
            self.empty().count_ones() as usize
        }
    }

    /// Places the mover's stone on `cell`, decides the winner, passes the turn.
    pub fn play(&mut self, cell: usize) -> Result<(), MoveError> {
        if self.is_over() {
            return Err(MoveError::GameOver);
        }
        if cell >= self.cells() {
            return Err(MoveError::OffBoard {
                cell,
                cells: self.cells(),
            });
        }
        let bit = 1u64 << cell;
        if self.empty() & bit == 0 {
            return Err(MoveError::Occupied { cell });
        }
        let player = self.to_move;
        let mine = &mut self.stones[usize::from(player - 1)];
        *mine |= bit;
        let group = self.geo.flood(bit, *mine);
        let (start, end) = self.geo.edges(player);
        if group & start != 0 && group & end != 0 {
            self.winner = Some(player);
        }
        self.moves += 1;
        self.to_move = 3 - player;
        Ok(())
    }

    /// The fewest empty cells `player` still has to fill to connect their edges (0 once connected),
    /// or `None` when the opponent has cut every path (the opponent has won).
    pub fn distance(&self, player: u8) -> Option<u32> {
        let g = &self.geo;
        let mine = self.stones[usize::from(player - 1)];
        let empty = self.empty();
        let (start, end) = g.edges(player);
        let mut reach = g.flood(start & mine, mine);
        let mut cost = 0;
        loop {
            if reach & end != 0 {
                return Some(cost);
            }
            let step = (g.neighbours(reach) | start) & empty;
            let next = g.flood(reach | step, mine);
            if next == reach {
                return None;
            }
            reach = next;
            cost += 1;
        }
    }

    /// Calls `f(index)` for every active one-hot feature (own stones at `0..n²`, opponent stones at
    /// `n²..2n²`, in the mover's frame) and returns the three dense extras (bias, own distance / n,
    /// opponent distance / n). A model's value is then a sparse sum; see [`Hex::features`].
    ///
    /// The mover's frame: player 2's board is transposed, so that "my" edges are always top and
    /// bottom. The transpose maps the hex adjacency onto itself, so one set of weights serves both
    /// players.
    pub fn for_each_feature(&self, mut f: impl FnMut(usize)) -> [f32; EXTRA_FEATURES] {
        let n = self.size();
        let me = self.to_move;
        let cells = n * n;
        let transpose = me == 2;
        for (offset, player) in [(0, me), (cells, 3 - me)] {
            let mut rest = self.stones[usize::from(player - 1)];
            while rest != 0 {
                let cell = rest.trailing_zeros() as usize;
                rest &= rest - 1;
                let index = if transpose {
                    (cell % n) * n + cell / n
                } else {
                    cell
                };
                f(offset + index);
            }
        }
        // A cut-off player needs more than any path could: n + 1.
        let unreachable = n as u32 + 1;
        let mine = self.distance(me).unwrap_or(unreachable);
        let theirs = self.distance(3 - me).unwrap_or(unreachable);
        [1.0, mine as f32 / n as f32, theirs as f32 / n as f32]
    }

    /// The position as [`feature_len`] floats from the perspective of the player to move.
    pub fn features(&self) -> Vec<f32> {
        let mut out = vec![0.0; feature_len(self.size())];
        let extras = self.for_each_feature(|i| out[i] = 1.0);
        let base = 2 * self.cells();
        out[base..].copy_from_slice(&extras);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(n: usize, r: usize, c: usize) -> usize {
        r * n + c
    }

    /// Plays `ones` for player 1 and `twos` for player 2, alternating, player 1 first.
    fn position(n: usize, ones: &[usize], twos: &[usize]) -> Hex {
        assert!(twos.len() == ones.len() || twos.len() + 1 == ones.len());
        let mut h = Hex::new(n);
        for i in 0..ones.len().max(twos.len()) {
            if let Some(&c) = ones.get(i) {
                h.play(c).unwrap();
            }
            if let Some(&c) = twos.get(i) {
                h.play(c).unwrap();
            }
        }
        h
    }

    #[test]
    fn neighbours_match_the_six_hex_directions() {
        for n in [1, 2, 5, 6, 8] {
            let g = Geometry::new(n);
            for r in 0..n as i32 {
                for c in 0..n as i32 {
                    let mut want = 0u64;
                    for (dr, dc) in [(0, 1), (0, -1), (1, 0), (-1, 0), (-1, 1), (1, -1)] {
                        let (rr, cc) = (r + dr, c + dc);
                        if (0..n as i32).contains(&rr) && (0..n as i32).contains(&cc) {
                            want |= 1 << (rr as usize * n + cc as usize);
                        }
                    }
                    let got = g.neighbours(1 << (r as usize * n + c as usize));
                    assert_eq!(got, want, "n={n} r={r} c={c}");
                }
            }
        }
    }

    #[test]
    fn player_one_wins_top_to_bottom_player_two_left_to_right() {
        let n = 8;
        // Player 1 straight down column 3; player 2 wanders on the right columns without a line.
        let ones: Vec<usize> = (0..n).map(|r| cell(n, r, 3)).collect();
        let twos: Vec<usize> = (0..n - 1).map(|r| cell(n, r, 7)).collect();
        let h = position(n, &ones, &twos);
        assert_eq!(h.winner(), Some(1));
        assert_eq!(h.move_count(), 15);

        // Player 2 straight across row 5.
        let ones: Vec<usize> = (0..n).map(|c| cell(n, 0, c)).collect();
        let twos: Vec<usize> = (0..n).map(|c| cell(n, 5, c)).collect();
        let mut h = Hex::new(n);
        for i in 0..n {
            h.play(ones[i]).unwrap();
            h.play(twos[i]).unwrap();
        }
        assert_eq!(h.winner(), Some(2));
        assert_eq!(h.play(cell(n, 7, 7)), Err(MoveError::GameOver));
        assert_eq!(h.legal_moves().count(), 0);
    }

    #[test]
    fn a_chain_along_the_anti_diagonal_connects_but_the_main_diagonal_does_not() {
        // (r, c) → (r+1, c-1) is a neighbour step; (r, c) → (r+1, c+1) is not.
        let n = 6;
        let mut anti = Hex::new(n);
        anti.stones[0] = (0..n).fold(0, |m, r| m | 1 << cell(n, r, n - 1 - r));
        assert_eq!(anti.distance(1), Some(0));
        let mut diag = Hex::new(n);
        diag.stones[0] = (0..n).fold(0, |m, r| m | 1 << cell(n, r, r));
        assert_eq!(diag.distance(1), Some(n as u32 - 1));
    }

    #[test]
    fn illegal_moves_are_refused_without_changing_the_position() {
        let mut h = Hex::new(6);
        h.play(7).unwrap();
        let before = h;
        assert_eq!(h.play(7), Err(MoveError::Occupied { cell: 7 }));
        assert_eq!(
            h.play(36),
            Err(MoveError::OffBoard {
                cell: 36,
                cells: 36
            })
        );
        assert_eq!(h, before);
        assert_eq!(h.cell(7), 1);
        assert_eq!(h.side_to_move(), 2);
        assert_eq!(h.legal_move_count(), 35);
        assert!(h.legal_moves().all(|c| c != 7));
    }

    #[test]
    fn every_full_random_game_has_exactly_one_winner() {
        let mut rng = fastrand::Rng::with_seed(11);
        for n in [2, 3, 6, 8] {
            for _ in 0..200 {
                let mut h = Hex::new(n);
                while !h.is_over() {
                    let moves: Vec<usize> = h.legal_moves().collect();
                    assert!(!moves.is_empty(), "a full board must have a winner");
                    h.play(moves[rng.usize(..moves.len())]).unwrap();
                }
                let w = h.winner().unwrap();
                assert_eq!(h.distance(w), Some(0));
                assert_eq!(h.distance(3 - w), None, "the loser is cut off");
            }
        }
    }

    #[test]
    fn distance_counts_the_empty_cells_still_needed() {
        let n = 8;
        let h = Hex::new(n);
        assert_eq!(h.distance(1), Some(8));
        assert_eq!(h.distance(2), Some(8));
        // Three stones of player 1 down column 2 save three cells; a player-2 stone in column 2
        // costs player 1 nothing (it goes around).
        let h = position(
            n,
            &[cell(n, 0, 2), cell(n, 1, 2), cell(n, 2, 2)],
            &[cell(n, 4, 2), cell(n, 7, 7)],
        );
        assert_eq!(h.side_to_move(), 2);
        assert_eq!(h.distance(1), Some(5));
        assert_eq!(h.distance(2), Some(7));
    }

    #[test]
    fn features_are_the_movers_view_and_transposed_for_player_two() {
        let n = 6;
        let cells = n * n;
        let mut h = Hex::new(n);
        h.play(cell(n, 1, 4)).unwrap(); // player 1
        // Player 2 to move: its own stones are none, the opponent's (1,4) appears transposed (4,1).
        let f = h.features();
        assert_eq!(f.len(), feature_len(n));
        assert_eq!(f[cells + cell(n, 4, 1)], 1.0);
        assert_eq!(f[..2 * cells].iter().sum::<f32>(), 1.0);
        assert_eq!(f[2 * cells], 1.0, "bias");
        assert_eq!(f[2 * cells + 1], 1.0, "player 2 still needs 6 of 6");
        assert!(
            (f[2 * cells + 2] - 5.0 / 6.0).abs() < 1e-6,
            "player 1 needs 5"
        );
        h.play(cell(n, 2, 2)).unwrap(); // player 2
        // Player 1 to move, untransposed.
        let f = h.features();
        assert_eq!(f[cell(n, 1, 4)], 1.0);
        assert_eq!(f[cells + cell(n, 2, 2)], 1.0);
        assert!(feature_len(8) <= 200);
    }

    #[test]
    fn mirrored_positions_give_the_same_features() {
        // Swapping the colours and transposing the board exchanges the players' roles exactly.
        let n = 8;
        let transpose = |bits: u64| {
            (0..n * n)
                .filter(|&i| bits & 1 << i != 0)
                .fold(0u64, |m, i| m | 1 << ((i % n) * n + i / n))
        };
        let ones = (1u64 << cell(n, 2, 5)) | (1 << cell(n, 3, 3)) | (1 << cell(n, 4, 3));
        let twos = (1u64 << cell(n, 6, 1)) | (1 << cell(n, 3, 4));
        let mut a = Hex::new(n);
        a.stones = [ones, twos];
        a.to_move = 2;
        let mut b = Hex::new(n);
        b.stones = [transpose(twos), transpose(ones)];
        b.to_move = 1;
        assert_eq!(a.features(), b.features());
    }
}
