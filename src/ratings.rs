//! Elo ratings fitted over every recorded game of a config key: the rating ladder.
//!
//! The fit is the maximum-likelihood Bradley–Terry model (Bradley and Terry 1952; Elo's logistic
//! curve is the same model on another scale): player `i` has strength `γᵢ`, and beats `j` with
//! probability `γᵢ / (γᵢ + γⱼ)`. It is solved with Hunter's minorization–maximization iteration
//! (Hunter 2004, "MM algorithms for generalized Bradley–Terry models", eq. 3), which converges
//! from any start. A draw counts as half a win for each side. As in BayesElo and Ordo, a prior of
//! one virtual draw between each player and the anchor keeps ratings finite when a player won or
//! lost every game (a model that beats random play 1000–0 would otherwise be infinitely strong).
//! Ratings are then `400 · log10(γᵢ / γ_anchor)` Elo, so the anchor (random play) is 0 Elo.
//!
//! Unlike sequential Elo updates (the `skillratings` crate and most ladders), the fit does not
//! depend on the order the matches were played in, and a re-fit over all games after each match
//! uses everything known; at the sizes of a promotion ladder (tens of players, hundreds of
//! matches) it takes microseconds.

use std::collections::BTreeMap;

/// The games between two players: `wins` for `player`, `losses` for it, and `draws`.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// Who played (a model's SHA-256, `random`, `heuristic`).
    pub player: String,
    /// Against whom.
    pub opponent: String,
    /// Games `player` won.
    pub wins: u64,
    /// Games `player` lost.
    pub losses: u64,
    /// Games drawn.
    pub draws: u64,
}

/// One player's fitted rating.
#[derive(Debug, Clone, PartialEq)]
pub struct Rating {
    /// Elo relative to the anchor (0).
    pub elo: f64,
    /// Games it played (the virtual prior draws not counted).
    pub games: u64,
}

/// The anchor of the scale when it played: uniform random play, 0 Elo.
pub const ANCHOR: &str = "random";

/// Iterations of the MM update at most; it stops earlier once no strength moves by 1e-9
/// (relative), which at ladder sizes takes a few hundred.
const MAX_ITERATIONS: usize = 10_000;

/// Fits ratings to `matches` (see the module's documentation). The anchor is [`ANCHOR`] when it
/// played, else the first player by name; every player gets a rating, the anchor 0.
pub fn fit(matches: &[Match]) -> BTreeMap<String, Rating> {
    let mut names: Vec<&str> = matches
        .iter()
        .flat_map(|m| [m.player.as_str(), m.opponent.as_str()])
        .collect();
    names.sort_unstable();
    names.dedup();
    let n = names.len();
    if n == 0 {
        return BTreeMap::new();
    }
    let index = |name: &str| names.binary_search(&name).expect("named above");
    let anchor = names.binary_search(&ANCHOR).unwrap_or(0);
    // Half-points won (wins + draws/2) and games, per pair, with one virtual draw against the
    // anchor for everyone else.
    let mut won = vec![0.0f64; n];
    let mut games = vec![vec![0.0f64; n]; n];
    let mut played = vec![0u64; n];
    for m in matches {
        let (i, j) = (index(&m.player), index(&m.opponent));
        if i == j {
            continue;
        }
        let total = (m.wins + m.losses + m.draws) as f64;
        won[i] += m.wins as f64 + m.draws as f64 / 2.0;
        won[j] += m.losses as f64 + m.draws as f64 / 2.0;
        games[i][j] += total;
        games[j][i] += total;
        played[i] += m.wins + m.losses + m.draws;
        played[j] += m.wins + m.losses + m.draws;
    }
    for i in (0..n).filter(|&i| i != anchor) {
        won[i] += 0.5;
        won[anchor] += 0.5;
        games[i][anchor] += 1.0;
        games[anchor][i] += 1.0;
    }
    let mut gamma = vec![1.0f64; n];
    for _ in 0..MAX_ITERATIONS {
        let mut moved = 0.0f64;
        for i in 0..n {
            let denominator: f64 = (0..n)
                .filter(|&j| games[i][j] > 0.0)
                .map(|j| games[i][j] / (gamma[i] + gamma[j]))
                .sum();
            if denominator > 0.0 {
                let next = (won[i] / denominator).max(1e-300);
                moved = moved.max((next - gamma[i]).abs() / gamma[i]);
                gamma[i] = next;
            }
        }
        let scale = gamma[anchor];
        gamma.iter_mut().for_each(|g| *g /= scale);
        if moved < 1e-9 {
            break;
        }
    }
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let elo = 400.0 * (gamma[i] / gamma[anchor]).log10();
            (
                name.to_string(),
                Rating {
                    elo: if elo.is_finite() { elo } else { 0.0 },
                    games: played[i],
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(player: &str, opponent: &str, wins: u64, losses: u64) -> Match {
        Match {
            player: player.into(),
            opponent: opponent.into(),
            wins,
            losses,
            draws: 0,
        }
    }

    #[test]
    fn a_score_of_three_to_one_is_about_191_elo() {
        // Elo: expected score 0.75 ⇔ a difference of 400·log10(3) ≈ 190.8. With many games the
        // prior's single virtual draw barely moves it.
        let r = fit(&[m("a", "random", 30_000, 10_000)]);
        assert_eq!(r["random"].elo, 0.0);
        assert!((r["a"].elo - 190.85).abs() < 0.5, "{r:?}");
        assert_eq!(r["a"].games, 40_000);
    }

    #[test]
    fn a_ladder_is_fitted_through_its_links_and_order_does_not_matter() {
        // b beats a 3:1 and c beats b 3:1: c is about 2 · 190.8 above a.
        let games = [
            m("a", "random", 500, 500),
            m("b", "a", 3000, 1000),
            m("c", "b", 3000, 1000),
        ];
        let r = fit(&games);
        let mut reversed = games.to_vec();
        reversed.reverse();
        let r2 = fit(&reversed);
        for p in ["a", "b", "c"] {
            assert!((r[p].elo - r2[p].elo).abs() < 1e-6);
        }
        assert!(r["a"].elo.abs() < 5.0, "{r:?}");
        assert!((r["c"].elo - r["a"].elo - 381.7).abs() < 5.0, "{r:?}");
    }

    #[test]
    fn a_clean_sweep_stays_finite_and_draws_count_half() {
        let r = fit(&[m("a", "random", 1000, 0)]);
        assert!(r["a"].elo.is_finite() && r["a"].elo > 800.0, "{r:?}");
        let r = fit(&[Match {
            player: "a".into(),
            opponent: "b".into(),
            wins: 0,
            losses: 0,
            draws: 100,
        }]);
        assert!(r["a"].elo.abs() < 1e-6 && r["b"].elo.abs() < 1e-6, "{r:?}");
        assert!(fit(&[]).is_empty());
    }
}
