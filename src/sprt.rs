//! The sequential probability ratio test that gates a promotion: is the candidate at least
//! `elo1` stronger than the canonical model (H1), or at most `elo0` (H0)?
//!
//! Wald's SPRT (A. Wald, "Sequential Tests of Statistical Hypotheses", 1945) on the candidate's
//! games against the baseline, as fishtest uses it for chess engines: games are played until the
//! log-likelihood ratio of the results under H1 against H0 leaves the interval
//! `[ln(β/(1−α)), ln((1−β)/α)]`, accepting H1 above it and H0 below it, so an even match stops
//! early as a rejection and a clearly stronger candidate early as an acceptance, with false
//! acceptance at most about α and false rejection at most about β. Elo differences become
//! expected scores with the logistic model `1/(1+10^(−elo/400))`. The built-in game has no
//! draws, so a game is a Bernoulli trial and the likelihood ratio is exact:
//! `W·ln(p1/p0) + L·ln((1−p1)/(1−p0))`; a draw counts as half a win and half a loss (the
//! trinomial's mean), which keeps the test usable for a user's own game.

use std::fmt;

/// The test's parameters: the two hypotheses in Elo and the error rates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sprt {
    /// H0: the candidate is at most this much stronger (Elo; fishtest's `elo0`).
    pub elo0: f64,
    /// H1: the candidate is at least this much stronger (Elo; greater than `elo0`).
    pub elo1: f64,
    /// The probability of accepting H1 when H0 holds (a false promotion), in (0, 0.5).
    pub alpha: f64,
    /// The probability of accepting H0 when H1 holds (a missed promotion), in (0, 0.5).
    pub beta: f64,
}

/// Where the test stands after some games.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// H1: the candidate is stronger by at least `elo1`.
    Accept,
    /// H0: it is not stronger by more than `elo0`.
    Reject,
    /// Neither bound reached yet.
    Continue,
}

impl Decision {
    /// `accept`, `reject` or `continue`, as results files record it.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::Reject => "reject",
            Decision::Continue => "continue",
        }
    }
}

/// The largest Elo difference a hypothesis may name (an expected score of 0.99999 or so).
pub const MAX_ELO: f64 = 2000.0;

/// The expected score of a player `elo` points stronger than its opponent (logistic model).
pub fn expected_score(elo: f64) -> f64 {
    1.0 / (1.0 + 10f64.powf(-elo / 400.0))
}

impl Sprt {
    /// The loop's default: H0 no stronger (0 Elo), H1 50 Elo stronger, 5 % error rates each way.
    pub const DEFAULT: Sprt = Sprt {
        elo0: 0.0,
        elo1: 50.0,
        alpha: 0.05,
        beta: 0.05,
    };

    /// Checks the parameters: finite, `elo0 < elo1`, both error rates in (0, 0.5).
    pub fn new(elo0: f64, elo1: f64, alpha: f64, beta: f64) -> Result<Sprt, String> {
        if !(elo0.is_finite() && elo1.is_finite()) || elo0 >= elo1 {
            return Err(format!("elo0 ({elo0}) must be less than elo1 ({elo1})"));
        }
        // Beyond this the expected scores round to 0 or 1 and the ratio is no longer finite.
        if elo0.abs() > MAX_ELO || elo1.abs() > MAX_ELO {
            return Err(format!(
                "elo0 ({elo0}) and elo1 ({elo1}) must be within ±{MAX_ELO}"
            ));
        }
        for (name, p) in [("alpha", alpha), ("beta", beta)] {
            if !(p > 0.0 && p < 0.5) {
                return Err(format!("{name} ({p}) must be in (0, 0.5)"));
            }
        }
        Ok(Sprt {
            elo0,
            elo1,
            alpha,
            beta,
        })
    }

    /// Parses `ELO0,ELO1,ALPHA,BETA` (the gauntlet job's `--sprt`), e.g. `0,50,0.05,0.05`.
    pub fn parse(text: &str) -> Result<Sprt, String> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        let [elo0, elo1, alpha, beta] = parts.as_slice() else {
            return Err(format!("{text:?}: expected ELO0,ELO1,ALPHA,BETA"));
        };
        let num = |name: &str, s: &str| {
            s.parse::<f64>()
                .map_err(|_| format!("{text:?}: {name} {s:?} is not a number"))
        };
        Sprt::new(
            num("elo0", elo0)?,
            num("elo1", elo1)?,
            num("alpha", alpha)?,
            num("beta", beta)?,
        )
    }

    /// The lower and upper bounds of the log-likelihood ratio: `ln(β/(1−α))`, `ln((1−β)/α)`.
    pub fn bounds(&self) -> (f64, f64) {
        (
            (self.beta / (1.0 - self.alpha)).ln(),
            ((1.0 - self.beta) / self.alpha).ln(),
        )
    }

    /// The log-likelihood ratio of H1 against H0 after `wins`, `draws` and `losses`.
    pub fn llr(&self, wins: u64, draws: u64, losses: u64) -> f64 {
        let (p0, p1) = (expected_score(self.elo0), expected_score(self.elo1));
        let w = wins as f64 + draws as f64 / 2.0;
        let l = losses as f64 + draws as f64 / 2.0;
        w * (p1 / p0).ln() + l * ((1.0 - p1) / (1.0 - p0)).ln()
    }

    /// Where the test stands after `wins`, `draws` and `losses`.
    pub fn decide(&self, wins: u64, draws: u64, losses: u64) -> Decision {
        let llr = self.llr(wins, draws, losses);
        let (lower, upper) = self.bounds();
        if llr >= upper {
            Decision::Accept
        } else if llr <= lower {
            Decision::Reject
        } else {
            Decision::Continue
        }
    }
}

impl fmt::Display for Sprt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{},{},{},{}",
            self.elo0, self.elo1, self.alpha, self.beta
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_scores_are_walds_and_the_logistic_models() {
        let t = Sprt::new(0.0, 50.0, 0.05, 0.05).unwrap();
        let (lower, upper) = t.bounds();
        assert!((lower - (0.05f64 / 0.95).ln()).abs() < 1e-12);
        assert!((upper - (0.95f64 / 0.05).ln()).abs() < 1e-12);
        assert!((expected_score(0.0) - 0.5).abs() < 1e-12);
        assert!((expected_score(400.0) - 10.0 / 11.0).abs() < 1e-12);
        assert!((expected_score(-400.0) - 1.0 / 11.0).abs() < 1e-12);
    }

    #[test]
    fn an_even_match_drifts_to_rejection_and_a_lopsided_one_to_acceptance() {
        let t = Sprt::new(0.0, 50.0, 0.05, 0.05).unwrap();
        assert_eq!(t.llr(0, 0, 0), 0.0);
        assert_eq!(t.decide(0, 0, 0), Decision::Continue);
        // Half the games won: the ratio falls (H0 is the likelier), slowly.
        assert!(t.llr(100, 0, 100) < 0.0);
        assert_eq!(t.decide(10, 0, 10), Decision::Continue);
        assert_eq!(t.decide(200, 0, 200), Decision::Reject);
        // Four in five won: accepted within a few dozen games.
        assert_eq!(t.decide(30, 0, 10), Decision::Continue);
        assert_eq!(t.decide(40, 0, 10), Decision::Accept);
        // A draw is half a win and half a loss.
        assert!((t.llr(1, 2, 1) - t.llr(2, 0, 2)).abs() < 1e-12);
    }

    #[test]
    fn bad_parameters_are_named() {
        assert!(
            Sprt::new(50.0, 0.0, 0.05, 0.05)
                .unwrap_err()
                .contains("elo0")
        );
        assert!(
            Sprt::new(0.0, 50.0, 0.0, 0.05)
                .unwrap_err()
                .contains("alpha")
        );
        assert!(
            Sprt::new(0.0, 50.0, 0.05, 0.5)
                .unwrap_err()
                .contains("beta")
        );
        assert!(Sprt::new(f64::NAN, 50.0, 0.05, 0.05).is_err());
        assert!(
            Sprt::new(0.0, 9000.0, 0.05, 0.05)
                .unwrap_err()
                .contains("within")
        );
        let t = Sprt::parse(" 0, 50 ,0.05,0.1").unwrap();
        assert_eq!((t.elo1, t.beta), (50.0, 0.1));
        assert_eq!(Sprt::parse(&t.to_string()).unwrap(), t);
        assert!(Sprt::parse("0,50,0.05").unwrap_err().contains("ELO0,ELO1"));
        assert!(Sprt::parse("0,x,0.05,0.05").unwrap_err().contains("elo1"));
    }
}
