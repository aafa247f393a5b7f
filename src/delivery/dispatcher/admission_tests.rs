//! The admission rule over every combination of small inputs, then the
//! cases the dispatcher meets most, by name.

use super::*;

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(600),
        multiplier: 2.0,
        max_attempts: None,
        max_age: Duration::from_secs(24 * 3600),
    }
}

/// A dispatcher of 16 slots with nothing going on.
fn idle() -> View {
    View {
        round: 16,
        in_flight: 0,
        ingest_busy: false,
        paused: false,
        unanswered: 0,
        rested: false,
        room_ahead: 32,
        backlog: true,
        claim_idle: true,
    }
}

fn go(view: View) -> Go {
    match admit(&view, &policy()) {
        Admission::Go(go) => go,
        rest => panic!("{view:?}: {rest:?}"),
    }
}

/// Every view with rounds 1–9 and the other inputs around their edges.
fn every_view() -> impl Iterator<Item = View> {
    let flags = [false, true];
    (1..=9usize).flat_map(move |round| {
        (0..=round).flat_map(move |in_flight| {
            (0..=2 * round as u32 + 1).flat_map(move |unanswered| {
                [0, 1, 7].into_iter().flat_map(move |room_ahead| {
                    flags.into_iter().flat_map(move |ingest_busy| {
                        flags.into_iter().flat_map(move |paused| {
                            flags.into_iter().flat_map(move |rested| {
                                flags.into_iter().flat_map(move |backlog| {
                                    flags.into_iter().map(move |claim_idle| View {
                                        round,
                                        in_flight,
                                        ingest_busy,
                                        paused,
                                        unanswered,
                                        rested,
                                        room_ahead,
                                        backlog,
                                        claim_idle,
                                    })
                                })
                            })
                        })
                    })
                })
            })
        })
    })
}

#[test]
fn every_combination_keeps_the_rule() {
    let policy = policy();
    let mut seen = 0;
    for view in every_view() {
        seen += 1;
        let round = view.round as u32;
        let silent = view.unanswered >= round;
        match admit(&view, &policy) {
            Admission::Rest(pause) => {
                assert!(silent && !view.rested, "{view:?} rests");
                assert_eq!(
                    pause,
                    policy.delay_bound(view.unanswered / round),
                    "{view:?}: the bound of the missed rounds"
                );
                assert!(pause > Duration::ZERO && pause <= UNREACHABLE_PAUSE_MAX);
            }
            Admission::Go(go) => {
                assert!(!silent || view.rested, "{view:?} must rest first");
                assert_eq!(go.takes_hot, !view.paused && !silent, "{view:?}");
                let claims = view.backlog && view.claim_idle;
                assert_eq!(
                    go.claim,
                    if claims { view.room_ahead } else { 0 },
                    "{view:?}"
                );
                // Ingest's share: a quarter of the slots, at least one.
                let share = if view.ingest_busy {
                    (view.round / 4).max(1)
                } else {
                    view.round
                };
                match go.launch {
                    Launch::Hold => assert!(view.paused, "{view:?} holds"),
                    Launch::MakeRoom => {
                        assert!(!view.paused && view.in_flight >= share, "{view:?}")
                    }
                    Launch::Up(count) => {
                        assert!(!view.paused && count > 0, "{view:?}");
                        assert_eq!(view.in_flight + count, share, "{view:?} fills its share");
                    }
                }
            }
        }
    }
    assert_eq!(seen, 96 * 2 * (2..=10).map(|n| n * n).sum::<usize>());
}

#[test]
fn an_idle_dispatcher_claims_and_fills_its_round() {
    assert_eq!(
        go(idle()),
        Go {
            takes_hot: true,
            claim: 32,
            launch: Launch::Up(16)
        }
    );
}

#[test]
fn no_claim_without_backlog_room_or_while_one_is_out() {
    assert_eq!(
        go(View {
            backlog: false,
            ..idle()
        })
        .claim,
        0
    );
    assert_eq!(
        go(View {
            claim_idle: false,
            ..idle()
        })
        .claim,
        0
    );
    assert_eq!(
        go(View {
            room_ahead: 0,
            ..idle()
        })
        .claim,
        0
    );
}

#[test]
fn busy_ingest_leaves_deliveries_a_quarter_of_the_slots() {
    let busy = View {
        ingest_busy: true,
        ..idle()
    };
    assert_eq!(go(busy).launch, Launch::Up(4));
    assert_eq!(
        go(View {
            in_flight: 3,
            ..busy
        })
        .launch,
        Launch::Up(1)
    );
    assert_eq!(
        go(View {
            in_flight: 4,
            ..busy
        })
        .launch,
        Launch::MakeRoom
    );
    assert_eq!(
        go(View { round: 2, ..busy }).launch,
        Launch::Up(1),
        "never less than one slot"
    );
}

#[test]
fn a_paused_target_starts_nothing_and_takes_no_hand_overs_but_may_claim() {
    assert_eq!(
        go(View {
            paused: true,
            ..idle()
        }),
        Go {
            takes_hot: false,
            claim: 32,
            launch: Launch::Hold
        }
    );
}

#[test]
fn a_silent_target_rests_longer_with_each_missed_round_up_to_the_cap() {
    let silent = |unanswered| {
        admit(
            &View {
                unanswered,
                ..idle()
            },
            &policy(),
        )
    };
    assert_eq!(
        go(View {
            unanswered: 15,
            ..idle()
        })
        .launch,
        Launch::Up(16)
    );
    assert_eq!(silent(16), Admission::Rest(Duration::from_secs(1)));
    assert_eq!(silent(31), Admission::Rest(Duration::from_secs(1)));
    assert_eq!(silent(32), Admission::Rest(Duration::from_secs(2)));
    assert_eq!(silent(48), Admission::Rest(Duration::from_secs(4)));
    assert_eq!(silent(16 * 40), Admission::Rest(UNREACHABLE_PAUSE_MAX));
}

#[test]
fn after_its_rest_a_silent_target_gets_one_round_but_no_hand_overs() {
    assert_eq!(
        go(View {
            unanswered: 16,
            rested: true,
            ..idle()
        }),
        Go {
            takes_hot: false,
            claim: 32,
            launch: Launch::Up(16)
        }
    );
}
