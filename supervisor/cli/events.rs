//! `events`: the event history page by page, then with `--follow` the new events as they come.

use super::*;

/// What `events` asks for.
pub(crate) struct EventsQuery {
    pub since: Option<u64>,
    pub types: Vec<String>,
    pub follow: bool,
    /// The newest N of the history.
    pub newest: Option<usize>,
    pub json: bool,
}

/// `events`: prints the history page by page (the supervisor answers at most 1,000 events at a
/// time and says where the next page starts), then with `follow` new events forever.
pub(crate) fn print_events(client: &mut Client, q: &EventsQuery) -> i32 {
    let mut out = std::io::stdout().lock();
    let mut request = Request::Events(EventsRequest {
        since: q.since,
        types: q.types.clone(),
        follow: q.follow,
        limit: q.newest,
    });
    let mut printed = 0usize;
    // Without follow, `-n N` prints N events, even if more arrived while paging.
    let room = |printed: usize| q.follow || q.newest.is_none_or(|n| printed < n);
    loop {
        if let Err(e) = client.send(&request) {
            eprintln!("error: {e}");
            return EXIT_FAILED;
        }
        let mut following = false;
        let next = loop {
            // Following waits as long as it takes; a listing should answer promptly.
            let timeout = (!following).then_some(Duration::from_secs(30));
            match client.next_frame(timeout) {
                Ok(FromSupervisor::Event { event }) => {
                    if !room(printed) {
                        continue;
                    }
                    printed += 1;
                    let line = if q.json {
                        serde_json::to_string(&event).expect("events serialize")
                    } else {
                        format!(
                            "{:>6}  {}  {:<28} {:<20} {}",
                            event.seq,
                            event.timestamp,
                            event.event_type,
                            match &event.node {
                                Some(node) => format!("{node}/{}", event.source),
                                None => event.source.clone(),
                            },
                            event.payload
                        )
                    };
                    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                        return 0;
                    }
                }
                Ok(FromSupervisor::EndOfEvents {
                    next_since: Some(next),
                    ..
                }) => break next,
                Ok(FromSupervisor::EndOfEvents { .. }) if !q.follow => return 0,
                // The history is done; new events follow on this connection.
                Ok(FromSupervisor::EndOfEvents { .. }) => following = true,
                Ok(other) => return report(&other),
                Err(ClientError::Closed) if following => {
                    eprintln!("the supervisor went away");
                    return 0;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_FAILED;
                }
            }
        };
        if !room(printed) {
            return 0;
        }
        request = Request::Events(EventsRequest {
            since: Some(next),
            types: q.types.clone(),
            follow: q.follow,
            limit: None,
        });
    }
}
