//! Just enough HTTP/1.1 to GET one document from a node's own endpoint (`admin`), which
//! pgmm itself serves: a client crate would be a large dependency for one request.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest body accepted: the status document is a few hundred bytes per peer.
const MAX_RESPONSE: usize = 1 << 20;

/// Why a GET failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing listens there (or the connect timed out): the node is not running.
    #[error("{0}")]
    Connect(std::io::Error),
    /// Something answered, but not with a usable HTTP response.
    #[error("{0}")]
    Response(String),
}

/// `GET path` on `addr`; the status code and the body.
pub async fn get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), HttpError> {
    let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(HttpError::Connect(e)),
        Err(_) => {
            return Err(HttpError::Connect(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )))
        }
    };
    let exchange = async {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(MAX_RESPONSE as u64 + 1)
            .read_to_end(&mut raw)
            .await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(HttpError::Response(e.to_string())),
        Err(_) => return Err(HttpError::Response(format!("no answer within {timeout:?}"))),
    };
    if raw.len() > MAX_RESPONSE {
        return Err(HttpError::Response(format!(
            "response larger than {MAX_RESPONSE} bytes"
        )));
    }
    parse_response(&raw)
}

/// Splits a whole `Connection: close` response into its status code and (de-chunked) body.
pub(crate) fn parse_response(raw: &[u8]) -> Result<(u16, String), HttpError> {
    let bad = |what: &str| HttpError::Response(format!("not an HTTP response ({what})"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|status| status.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("malformed chunked body"))?
    } else {
        body.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| bad("body is not UTF-8"))?;
    Ok((code, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}
