//! `mosmon`: a live terminal monitor of the cluster, as the seed's mosmon: for each node its load
//! per CPU, how busy its CPUs are, its free memory, memory pressure and free slots, and how old
//! the figure is, refreshed every second from an agent (`mosaicd`) that gossips.
//!
//! ```text
//! mosmon [--node NODE] [--interval SECONDS] [--once]
//! ```
//! `q` or Esc quits. `--once` prints one table as text and exits (for scripts).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use mosaic_cluster::gossip::{ask_view, ClusterView};
use mosaic_cluster::resolve_node;
use mosaic_transport::{connect, ClusterKey, ConnectOptions};
use ratatui::crossterm::event::{self, Event, KeyCode};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table};

#[derive(Parser)]
#[command(
    name = "mosmon",
    version,
    about = "A live monitor of a Mosaic cluster: each node's load, CPUs, memory and pressure",
    long_about = "A live terminal monitor of a Mosaic cluster, as an agent (mosaicd) knows it: each \
                  node's load per CPU, how busy its CPUs are, free memory, memory pressure, free \
                  slots and the age of the figure, refreshed every --interval. q or Esc quits. The \
                  cluster key comes from MOSAIC_CLUSTER_KEY or MOSAIC_CLUSTER_KEY_FILE."
)]
struct Args {
    /// The agent to ask: an address or a name from MOSAIC_NODES [default: MOSAIC_AGENT, or
    /// tcp://127.0.0.1:7070].
    #[arg(long)]
    node: Option<String>,
    /// Seconds between refreshes.
    #[arg(long, default_value = "1")]
    interval: f64,
    /// Print the table once as text and exit.
    #[arg(long)]
    once: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mosmon: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let key = ClusterKey::from_env().map_err(|e| format!("the cluster key: {e}"))?;
    let node = args.node.clone().unwrap_or_else(mosaic_cluster::local_agent);
    let uri = resolve_node(&node).map_err(|e| e.to_string())?;
    let uri_c = uri.clone();
    let mut o = ConnectOptions::new(key);
    o.timeout = Duration::from_secs(2);
    o.connect_timeout = Duration::from_secs(2);
    let mut conn = Some(connect(&uri, &o).map_err(|e| format!("{uri}: {}", mosaic_transport::error_chain(&e)))?);
    // Asks, reconnecting first if the last call failed (the agent restarted, say).
    let mut ask_now = move || -> Result<ClusterView, String> {
        if conn.is_none() {
            conn = Some(connect(&uri_c, &o).map_err(|e| mosaic_transport::error_chain(&e))?);
        }
        let r = conn.as_ref().map_or_else(|| Err("not connected".to_string()), ask_view);
        if r.is_err() {
            conn = None;
        }
        r
    };
    if args.once {
        print!("{}", ask_now()?.text_table());
        return Ok(());
    }
    if !args.interval.is_finite() {
        return Err(format!("--interval {}: a number of seconds", args.interval));
    }
    let interval = Duration::from_secs_f64(args.interval.clamp(0.1, 3600.0));
    let mut terminal = ratatui::init();
    let result = (|| -> Result<(), String> {
        let mut view: Result<ClusterView, String> = ask_now();
        let mut next = Instant::now() + interval;
        loop {
            terminal.draw(|f| draw(f, &uri, &view)).map_err(|e| e.to_string())?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait).map_err(|e| e.to_string())? {
                if let Event::Key(k) = event::read().map_err(|e| e.to_string())? {
                    if matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= next {
                view = ask_now();
                next = Instant::now() + interval;
            }
        }
    })();
    ratatui::restore();
    result
}

fn draw(f: &mut ratatui::Frame<'_>, uri: &str, view: &Result<ClusterView, String>) {
    let [top, body] = Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(f.area());
    let title = Line::from(vec!["mosmon".bold(), format!("  the cluster as {uri} knows it   (q quits)").into()]);
    f.render_widget(Paragraph::new(title), top);
    match view {
        Err(e) => f.render_widget(Paragraph::new(format!("cannot ask {uri}: {e}")).red(), body),
        Ok(v) => {
            let all = v.table();
            let header = Row::new(all[0].iter().map(|h| Cell::from(h.clone()))).style(Style::new().bold());
            let body_rows = all[1..].iter().map(|r| {
                let load: f64 = r[1].parse().unwrap_or(0.0);
                let color = if load >= 1.5 {
                    Color::Red
                } else if load >= 0.75 {
                    Color::Yellow
                } else {
                    Color::Green
                };
                Row::new(r.iter().map(|c| Cell::from(c.clone()))).style(Style::new().fg(color))
            });
            let widths = [
                Constraint::Min(24),
                Constraint::Length(9),
                Constraint::Length(5),
                Constraint::Length(6),
                Constraint::Length(9),
                Constraint::Length(7),
                Constraint::Length(10),
                Constraint::Length(6),
                Constraint::Length(11),
            ];
            let t = Table::new(body_rows, widths)
                .header(header)
                .block(Block::bordered().title(format!(" {} node(s) ", v.members.len() + 1)));
            f.render_widget(t, body);
        }
    }
}
