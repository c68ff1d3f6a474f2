//! `picket playbook apply FILE|DIR`: keeps a tenant's playbooks in YAML
//! files. Each playbook is created, or updated by name when it differs (at
//! the version read, so a concurrent change is not overwritten), or left
//! alone when it is the same: applying twice changes nothing. Every file is
//! checked first; any error (with its file and line) stops the command
//! before anything is sent.

use std::path::PathBuf;

use anyhow::Context;

use crate::cli::client::ServerArgs;
use crate::domain::playbook::PlaybookDef;
use crate::grpc::pb;
use crate::grpc::pb::playbook_service_client::PlaybookServiceClient;
use crate::grpc::playbooks::def_to_pb;
use crate::response::pack;

/// `picket playbook apply` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// A playbook file (`*.yml`) or a directory of them.
    pub path: PathBuf,
    /// Check the files only; send nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// What `apply` did to one playbook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It did not exist.
    Created,
    /// It differed.
    Updated,
    /// It was the same.
    Unchanged,
}

/// The parts of a playbook a file defines, normalized for comparison.
fn comparable(p: &pb::Playbook) -> pb::Playbook {
    let mut steps = p.steps.clone();
    for s in &mut steps {
        s.timeout_seconds = match s.timeout_seconds {
            0 => crate::domain::playbook::DEFAULT_TIMEOUT_SECONDS,
            n => n,
        };
        s.max_attempts = match s.max_attempts {
            0 => crate::domain::playbook::DEFAULT_ATTEMPTS,
            n => n,
        };
    }
    pb::Playbook {
        name: p.name.clone(),
        description: p.description.clone(),
        steps,
        trigger: Some(p.trigger.clone().unwrap_or_default()),
        enabled: p.enabled,
        required_approvals: p.required_approvals.max(1),
        ..Default::default()
    }
}

/// Runs the command.
pub async fn run(args: ApplyArgs) -> anyhow::Result<()> {
    let mut defs: Vec<(String, PlaybookDef)> = Vec::new();
    let mut errors = Vec::new();
    let files = pack::yaml_files(&args.path)?;
    if files.is_empty() {
        anyhow::bail!("no *.yml or *.yaml files in {}", args.path.display());
    }
    for f in files {
        let file = f.display().to_string();
        let text = std::fs::read_to_string(&f).with_context(|| format!("failed to read {file}"))?;
        let (found, errs) = pack::parse_file(&file, &text);
        errors.extend(errs);
        for d in found {
            if defs.iter().any(|(_, e)| e.name == d.name) {
                errors.push(pack::PackError {
                    file: file.clone(),
                    error: crate::domain::playbook::yaml::FileError {
                        line: 1,
                        message: format!("a playbook named `{}` is defined twice", d.name),
                    },
                });
            } else {
                defs.push((file.clone(), d));
            }
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        anyhow::bail!("{} error(s); nothing was applied", errors.len());
    }
    if args.dry_run {
        for (file, d) in &defs {
            println!("ok {} ({file})", d.name);
        }
        return Ok(());
    }
    let mut client = PlaybookServiceClient::new(args.server.channel().await?);
    // The tenant's own playbooks by name (shared ones are never updated).
    let mut existing = std::collections::HashMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_playbooks(args.server.request(pb::ListPlaybooksRequest {
                page_size: 1000,
                page_token: token,
            })?)
            .await
            .map_err(|s| {
                anyhow::anyhow!("listing playbooks failed: {} ({:?})", s.message(), s.code())
            })?
            .into_inner();
        for p in page.playbooks {
            if p.origin == pb::PlaybookOrigin::Tenant as i32 {
                existing.insert(p.name.clone(), p);
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut failed = 0;
    for (file, d) in defs {
        let wanted = def_to_pb(&d);
        let outcome = match existing.get(&d.name) {
            Some(p) if comparable(p) == comparable(&wanted) => Ok((Applied::Unchanged, p.version)),
            Some(p) => {
                let mut next = wanted.clone();
                next.id = p.id.clone();
                next.version = p.version;
                client
                    .update_playbook(args.server.request(pb::UpdatePlaybookRequest {
                        playbook: Some(next),
                    })?)
                    .await
                    .map(|r| {
                        (
                            Applied::Updated,
                            r.into_inner().playbook.map_or(0, |p| p.version),
                        )
                    })
            }
            None => client
                .create_playbook(args.server.request(pb::CreatePlaybookRequest {
                    playbook: Some(wanted),
                })?)
                .await
                .map(|_| (Applied::Created, 1)),
        };
        match outcome {
            Ok((applied, version)) => println!(
                "{} {} (version {version}, {file})",
                match applied {
                    Applied::Created => "created",
                    Applied::Updated => "updated",
                    Applied::Unchanged => "unchanged",
                },
                d.name
            ),
            Err(status) => {
                failed += 1;
                use tonic_types::StatusExt;
                let fields = status
                    .get_details_bad_request()
                    .map(|b| {
                        b.field_violations
                            .iter()
                            .map(|v| format!("{}: {}", v.field, v.description))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                eprintln!(
                    "{file}: playbook `{}`: {} ({:?}){}",
                    d.name,
                    status.message(),
                    status.code(),
                    if fields.is_empty() {
                        String::new()
                    } else {
                        format!(": {fields}")
                    }
                );
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} playbook(s) could not be applied");
    }
    Ok(())
}
